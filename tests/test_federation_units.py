"""Datasets, partitioners, models, strategies, config parsing and accounting of ``federation``."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import privacy
from federation.accounting import RoundAccountant
from federation.config import ExperimentConfig
from federation.data import (
    Dataset,
    check_available,
    default_data_dir,
    load_dataset,
    partition,
)
from federation.models import build_model, get_flat, num_params, set_flat
from federation.strategies import Strategy
from federation.training import LocalTraining, train_client
from privacy.datasets import read_idx
from secagg.errors import ConfigError, DataError

torch.set_num_threads(1)
DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data (MNIST, FEMNIST, finance) not present")


def toy(n=600, classes=3, groups=None) -> Dataset:
    rng = np.random.default_rng(0)
    y = rng.integers(classes, size=n)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return Dataset("toy", x, y, x[:10], y[:10], classes, groups_train=groups)


# ------------------------------------------------------------------ partitioners

def test_iid_partition_is_a_disjoint_cover():
    parts = partition(toy(), num_clients=7, scheme="iid")
    joined = np.concatenate(parts)
    assert len(joined) == 600 and len(np.unique(joined)) == 600
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_skews_labels_more_for_smaller_alpha():
    data = toy(3000)

    def skew(alpha):
        parts = partition(data, num_clients=10, scheme="dirichlet", alpha=alpha, seed=1)
        assert len(np.unique(np.concatenate(parts))) == 3000
        shares = [np.bincount(data.y_train[p], minlength=3) / len(p) for p in parts]
        return float(np.mean([s.max() for s in shares]))

    assert skew(0.1) > skew(100.0) + 0.2
    assert skew(100.0) < 0.45  # near-uniform over 3 classes


def test_natural_partition_is_one_writer_per_client():
    groups = np.repeat(np.arange(6), [50, 40, 30, 200, 10, 270])
    parts = partition(toy(groups=groups), num_clients=4, scheme="natural")
    assert sorted(len(p) for p in parts) == [40, 50, 200, 270]  # the 4 largest writers
    for p in parts:
        assert len(np.unique(groups[p])) == 1
    with pytest.raises(ConfigError, match="writers"):
        partition(toy(groups=groups), num_clients=7, scheme="natural")
    with pytest.raises(ConfigError, match="femnist"):
        partition(toy(), num_clients=2, scheme="natural")


def test_unknown_partition_and_too_many_clients():
    with pytest.raises(ConfigError, match="unknown partition"):
        partition(toy(), num_clients=2, scheme="shards")
    with pytest.raises(ConfigError, match="training samples"):
        partition(toy(10), num_clients=8, scheme="iid")


# ------------------------------------------------------------------ datasets

def test_breast_cancer_is_standardised_and_stratified():
    data = load_dataset("breast_cancer")
    assert data.x_train.shape == (455, 30) and data.x_test.shape == (114, 30)
    np.testing.assert_allclose(data.x_train.mean(0), 0, atol=1e-5)
    assert abs(data.y_train.mean() - data.y_test.mean()) < 0.02


def test_idx_reader_round_trips(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(read_idx(path), images)
    path.write_bytes(gzip.compress(bytes([0, 0, 9, 1, 0, 0, 0, 1, 7])))
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "mnist" / "raw").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        check_available("mnist", tmp_path)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in str(err.value)
    with pytest.raises(DataError, match="femnist/femnist.npz"):
        load_dataset("femnist", tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset"):
        check_available("cifar", tmp_path)


@needs_data
def test_mnist_and_femnist_from_the_data_dir():
    mnist = load_dataset("mnist", DATA)
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.y_test.shape == (10000,)
    assert set(np.unique(mnist.y_train)) == set(range(10))
    femnist = load_dataset("femnist", DATA)
    assert femnist.num_classes == 62 and len(np.unique(femnist.groups_train)) == 105
    # background is dark after the polarity flip, like MNIST: the corner pixel is the minimum
    assert femnist.x_train[0, 0, 0, 0] == femnist.x_train.min()


@needs_data
def test_finance_from_the_data_dir():
    data = load_dataset("finance", DATA)
    assert data.x_train.shape[1] == 23 and len(data.y_train) + len(data.y_test) == 30000
    assert 0.2 < data.y_train.mean() < 0.24  # 22.12 % defaults


# ------------------------------------------------------------------ models and training

@pytest.mark.parametrize("name, shape", [("logreg", (30,)), ("mlp", (64,)), ("cnn", (1, 28, 28))])
def test_models_are_opacus_compatible_and_flatten_round_trips(name, shape):
    from opacus.validators import ModuleValidator

    model = build_model(name, shape, 10)
    assert ModuleValidator.validate(model, strict=False) == []
    flat = get_flat(model)
    assert flat.shape == (num_params(model),)
    other = build_model(name, shape, 10)
    set_flat(other, flat)
    np.testing.assert_array_equal(get_flat(other), flat)


def test_local_training_never_writes_into_the_global_parameters():
    data = toy()
    build = lambda: build_model("logreg", (4,), 3)
    params = get_flat(build())
    before = params.copy()
    update = train_client(build, params, data.x_train, data.y_train, LocalTraining(lr=0.5), client=0, seed=1)
    np.testing.assert_array_equal(params, before)
    assert np.linalg.norm(update.delta) > 0


def test_dpsgd_local_training_runs_and_is_noisy():
    data = toy(200)
    build = lambda: build_model("logreg", (4,), 3)
    params = get_flat(build())
    cfg = LocalTraining(batch_size=20, dp_sgd=True, noise_multiplier=1.0, max_grad_norm=1.0)
    a = train_client(build, params, data.x_train, data.y_train, cfg, client=0, seed=1)
    b = train_client(build, params, data.x_train, data.y_train, cfg, client=0, seed=2)
    assert a.steps == 10 and not np.allclose(a.delta, b.delta)
    # each step moves at most lr * (clip + noise); the noise is what makes a and b differ
    assert np.all(np.isfinite(a.delta))


def test_dpsgd_local_training_goes_through_privacy_make_private():
    """The engine's DP-SGD is privacy.make_private's: its model checks and its seeded noise."""
    data = toy(200)
    params = get_flat(build_model("logreg", (4,), 3))
    seeded = LocalTraining(batch_size=20, dp_sgd=True, secure_noise=False)
    build = lambda: build_model("logreg", (4,), 3)
    a, b = (train_client(build, params, data.x_train, data.y_train, seeded, client=0, seed=3) for _ in range(2))
    np.testing.assert_array_equal(a.delta, b.delta)  # deterministic runs: noise and batches follow the seed
    with_batchnorm = lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    bn_params = get_flat(with_batchnorm())
    with pytest.raises(ConfigError, match="BatchNorm"):  # privacy's explanation, not an Opacus traceback
        train_client(with_batchnorm, bn_params, data.x_train, data.y_train, seeded, client=0, seed=3)
    model = build()
    with pytest.raises(ConfigError, match="secure_mode=False"):  # a seed never silently weakens real noise
        privacy.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
                                 torch.zeros(4, 4), torch.zeros(4, dtype=torch.long))),
                             noise_multiplier=1.0, max_grad_norm=1.0, seed=1)


# ------------------------------------------------------------------ strategies

def test_fedavg_is_a_step_along_the_mean_update():
    s = Strategy("fedavg", server_lr=0.5)
    np.testing.assert_allclose(s.apply(np.ones(3), np.array([2.0, 0, -2])), [2.0, 1.0, 0.0])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_first_step_matches_reddi_et_al(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = Strategy(name, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    x, d = np.array([1.0, 1.0]), np.array([0.5, -0.02])
    m = (1 - b1) * d
    if name == "fedadam":
        v = b2 * tau**2 + (1 - b2) * d**2
    else:
        v = tau**2 - (1 - b2) * d**2 * np.sign(tau**2 - d**2)
    np.testing.assert_allclose(s.apply(x, d), x + lr * m / (np.sqrt(v) + tau))
    state = s.state_arrays()
    fresh = Strategy(name, server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    fresh.load_state_arrays(state)
    np.testing.assert_allclose(fresh.apply(x, d), s.apply(x, d))


def test_strategy_validation():
    with pytest.raises(ConfigError, match="unknown strategy"):
        Strategy("fedsgd")
    with pytest.raises(ConfigError, match="fedprox"):
        Strategy("fedavg", proximal_mu=0.1)


# ------------------------------------------------------------------ config

def test_toml_sections_and_cli_overrides(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('[data]\ndataset = "digits"\nnum_clients = 20\n[training]\nrounds = 4\n'
                    '[faults]\ndropout_schedule = [{round = 1, stage = "share", clients = [3]}]\n')
    cfg = ExperimentConfig.from_toml(path)
    assert (cfg.dataset, cfg.num_clients, cfg.rounds) == ("digits", 20, 4)
    assert cfg.dropout_schedule == [{"round": 1, "stage": "share", "clients": [3]}]
    cfg.set("rounds", "7")
    cfg.set("threshold", "none")
    cfg.set("deterministic", "true")
    assert (cfg.rounds, cfg.threshold, cfg.deterministic) == (7, None, True)
    again = ExperimentConfig.from_dict(cfg.to_sections())
    assert again == cfg


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'rounds'.*\[training\]"):
        ExperimentConfig.from_dict({"data": {"rounds": 3}})
    with pytest.raises(ConfigError, match="unknown option 'epochs'"):
        ExperimentConfig.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="expects int"):
        ExperimentConfig.from_dict({"rounds": "many"})
    bad = ExperimentConfig(strategy="x", dp="dpsgd", threshold=40, protection="masking")
    problems = bad.validate(strict=False)
    assert len(problems) == 3  # strategy, budget, threshold: all reported at once


# ------------------------------------------------------------------ accounting

def test_record_level_accounting_is_the_worst_clients_dpsgd_epsilon():
    sizes = [100, 40, 95]
    acct = RoundAccountant(dp="dpsgd", delta=1e-5, noise_multiplier=1.2, client_sizes=sizes,
                           batch_size=10, epochs=1, accountant="rdp")
    # largest sampling rate (40-sample client) and most steps (100-sample client) bound every client
    expected = privacy.epsilon(noise_multiplier=1.2, sample_rate=10 / 40, steps=5 * 10, delta=1e-5, accountant="rdp")
    assert acct.epsilon_after(5) == pytest.approx(expected)
    for n in sizes:
        own = privacy.epsilon(noise_multiplier=1.2, sample_rate=10 / n, steps=5 * -(-n // 10), delta=1e-5,
                              accountant="rdp")
        assert own <= expected
    assert acct.epsilon_after(0) == 0.0
    assert acct.rounds_within(expected, 50) == 5


def test_user_level_accounting_is_dpfedavg():
    acct = RoundAccountant(dp="user", delta=1e-5, noise_multiplier=1.0, client_sample_rate=0.1,
                           clip=1.0, accountant="rdp")
    expected = privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=1e-5, accountant="rdp")
    assert acct.epsilon_after(20) == pytest.approx(expected)
    assert acct.round_event().level.value == "user"
