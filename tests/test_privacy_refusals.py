"""What cannot be accounted is refused: shuffled batches passed off as Poisson, and deltas that
are no guarantee (>= 1/n, or >= 0.1 whatever n)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import privacy
from federation.config import ExperimentConfig
from federation.engine import Federation
from privacy._checks import check_delta
from privacy.dpsgd import make_private
from privacy.ledger import Ledger
from secagg.cli import main as cli_main
from secagg.errors import ConfigError, UnsupportedEventError
from tests.test_privacy_dpsgd import _data, _model


def test_shuffled_fixed_batches_have_no_poisson_event():
    """Before: make_private(poisson_sampling=False) recorded a Poisson event for shuffled batches."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="no privacy event"):
        pt = make_private(model=model, optimizer=opt, data_loader=DataLoader(_data(), batch_size=64,
                                                                             shuffle=True),
                          noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    try:
        with pytest.raises(UnsupportedEventError, match="poisson_sampling=True"):
            pt.event()
        with pytest.raises(UnsupportedEventError, match="poisson_sampling=True"):
            pt.epsilon(1e-5)
    finally:
        pt.close()


@pytest.mark.parametrize("delta", [0.1, 0.5, 0.99])
def test_large_delta_is_refused_everywhere(tmp_path, delta):
    """Before: delta = 0.5 ran to the end and printed epsilon = -0.676."""
    with pytest.raises(ConfigError, match="too large"):
        check_delta(delta)
    with pytest.raises(ConfigError, match="too large"):
        privacy.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=delta)
    with pytest.raises(ConfigError, match="too large"):
        Ledger(tmp_path / f"l{delta}.db", budget_epsilon=3.0, delta=delta)


def test_plan_exits_non_zero_on_a_large_delta(capsys):
    code = cli_main(["plan", "--sigma", "1", "--sample-rate", "0.01", "--steps", "100", "--delta", "0.5"])
    assert code != 0
    assert "too large" in capsys.readouterr().err


def cfg(tmp_path, **options) -> ExperimentConfig:
    base = dict(dataset="breast_cancer", num_clients=6, clients_per_round=6, rounds=1, batch_size=16,
                protection="none", budget_epsilon=50.0, accountant="rdp", out_dir=str(tmp_path / "run"))
    base.update(options)
    return ExperimentConfig.from_dict(base)


def test_federation_refuses_delta_at_or_above_one_over_n(tmp_path):
    # user level: n = 6 clients; 0.05 < 0.1 but >= 1/6... and 1/6 > 0.1, so use 0.09 vs 1/12
    with pytest.raises(ConfigError, match="1/n = 1/12"):
        Federation(cfg(tmp_path, dp="user", num_clients=12, clients_per_round=12, update_clip=1.0,
                       delta=0.09))
    # record level: n = records of the largest client (about 455 / 6 = 76 here)
    with pytest.raises(ConfigError, match="1/n"):
        Federation(cfg(tmp_path, dp="dpsgd", delta=0.02))
    assert not (tmp_path / "run").exists()


def test_dpsgd_noise_does_not_follow_the_task_seed():
    """Before: the engine's DP-SGD noise came from a torch generator seeded by the task's seed."""
    from federation.models import build_model
    from federation.training import LocalTraining, train_client
    from tests.test_privacy_dpsgd import _data

    ds = _data(n=64)
    x, y = ds.tensors[0].numpy(), ds.tensors[1].numpy()
    build = lambda: build_model("mlp", (8,), 2, hidden=4)
    params = np.zeros(sum(p.numel() for p in build().parameters()), dtype=np.float32)
    local = LocalTraining(batch_size=16, dp_sgd=True, noise_multiplier=1.0, max_grad_norm=1.0)
    a = train_client(build, params, x, y, local, client=0, seed=123)
    b = train_client(build, params, x, y, local, client=0, seed=123)
    assert not np.array_equal(a.delta, b.delta)
    # deterministic test runs (secure_noise=False) do follow the seed, on purpose
    det = LocalTraining(batch_size=16, dp_sgd=True, noise_multiplier=1.0, max_grad_norm=1.0, secure_noise=False)
    c = train_client(build, params, x, y, det, client=0, seed=123)
    d = train_client(build, params, x, y, det, client=0, seed=123)
    assert np.array_equal(c.delta, d.delta)


def test_central_noise_is_os_drawn_on_a_grid_and_accounted_as_such(tmp_path):
    """Before: central user-level noise was numpy PCG64 floats, open to floating-point attacks."""
    from privacy.dpfedavg import GRID_BITS, add_gaussian_noise, effective_noise_multiplier

    total = np.linspace(-3.0, 3.0, 2001)
    a = add_gaussian_noise(total, noise_multiplier=1.0, clip_norm=0.5)
    b = add_gaussian_noise(total, noise_multiplier=1.0, clip_norm=0.5)
    steps = a / (0.5 * 2.0**-GRID_BITS)
    assert np.array_equal(steps, np.round(steps))  # exact multiples of the grid step
    assert not np.array_equal(a, b)
    # 2001 draws: the sample std is within 10% of 0.5 except with probability < 1e-9
    assert np.std(a - total) == pytest.approx(0.5, rel=0.1)
    fed = Federation(cfg(tmp_path, dp="user", update_clip=0.5, noise_multiplier=1.0))
    z = fed.accountant.round_event().noise_multiplier
    assert z == effective_noise_multiplier(noise_multiplier=1.0, clip_norm=0.5, dim=len(fed.params))
    assert 1.0 - 1e-3 < z < 1.0  # the ledger records what the grid really gives, not the nominal 1.0
    noised = fed.release_total(np.zeros(len(fed.params)))
    grid = noised / (0.5 * 2.0**-GRID_BITS)
    assert np.array_equal(grid, np.round(grid))
