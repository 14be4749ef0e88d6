"""What cannot be accounted is refused: shuffled batches passed off as Poisson, and deltas that
are no guarantee (>= 1/n, or >= 0.1 whatever n)."""

from __future__ import annotations

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
