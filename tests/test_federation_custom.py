"""The caller's own model, data, loss and hooks: ``Federation(model=..., client_data=[...], ...)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from federation import Federation
from federation.config import ExperimentConfig
from federation.models import LogisticRegression
from secagg.errors import ConfigError

torch.set_num_threads(1)

RNG = np.random.default_rng(7)
X = RNG.normal(size=(90, 5)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
SITES = [(X[i::3], Y[i::3]) for i in range(3)]


def fed(tmp_path, **kwargs) -> Federation:
    base = dict(model=lambda: torch.nn.Linear(5, 2), client_data=SITES, protection="none", rounds=1,
                batch_size=8, out_dir=str(tmp_path / "run"))
    base.update(kwargs)
    return Federation(**base)


def test_own_model_and_data_give_the_builtin_run_exactly(tmp_path):
    """The same partition, handed over as client_data, trains the same model as the built-in path."""
    cfg = ExperimentConfig.from_dict(dict(dataset="breast_cancer", num_clients=3, clients_per_round=3,
                                          rounds=2, batch_size=32, protection="none",
                                          out_dir=str(tmp_path / "builtin")))
    builtin = Federation(cfg)
    builtin.run()
    data = builtin.dataset
    own = Federation(
        model=lambda: LogisticRegression(data.x_train.shape[1], 2),
        client_data=[(data.x_train[p], data.y_train[p]) for p in builtin.parts],
        test_data=(data.x_test, data.y_test), rounds=2, batch_size=32, protection="none",
        out_dir=str(tmp_path / "own"),
    )
    summary = own.run()
    np.testing.assert_array_equal(own.params, builtin.params)
    assert summary.final_accuracy == pytest.approx(builtin.evaluate()[0])
    assert own.config.clients_per_round == 3  # every site in every round by default


def test_train_and_evaluate_hooks_and_a_regression_loss(tmp_path):
    w = np.array([1.0, -2.0, 0.5, 0.0, 3.0], dtype=np.float32)
    sites = [(x, x @ w) for x, _ in SITES]
    calls = []

    def train(model, loader):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
            loss.backward()
            opt.step()
        calls.append(len(loader.dataset))
        return loss.item()

    def error(model):
        return {"weight_error": torch.linalg.norm(model.weight[0] - torch.from_numpy(w))}

    f = fed(tmp_path, model=torch.nn.Linear(5, 1), client_data=sites, train=train, evaluate=error,
            loss=lambda out, y: torch.nn.functional.mse_loss(out.squeeze(1), y), test_data=sites[0], rounds=8, protection="masking")
    summary = f.run()
    assert sorted(calls[:3]) == [30, 30, 30]  # each site trained on its own 30 records
    errors = [r.metrics["weight_error"] for r in summary.rounds]
    assert errors[-1] < 0.2 * errors[0]
    assert summary.rounds[-1].accuracy is None  # regression: no accuracy, the loss is MSE
    assert summary.rounds[-1].loss < 0.5
    assert summary.rounds[-1].train_loss is not None


def test_torch_datasets_are_accepted_as_sites(tmp_path):
    sites = [torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)) for x, y in SITES]
    summary = fed(tmp_path, client_data=sites, test_data=SITES[0]).run()
    assert summary.rounds[0].included == [0, 1, 2]


@pytest.mark.parametrize(("kwargs", "fragment"), [
    (dict(nosie_multiplier=1.0), "did you mean 'noise_multiplier'"),
    (dict(seed="abc"), "option 'seed' expects int, got the string 'abc'"),
    (dict(noise_multiplier="1.5"), "write the value without quotes"),
    (dict(partition="dirichlet"), "partition describe a built-in dataset"),
    (dict(num_clients=4), "client_data holds 3 sites"),
    (dict(client_data=[]), "client_data is empty"),
    (dict(client_data=SITES[0]), "client_data[0] must be an (x, y) pair"),
    (dict(client_data=[(X[:10], Y[:9])]), "x has 10 rows but y has 9"),
    (dict(client_data=[(X[:10], Y[:10]), (X[:10, :4], Y[:10])]), "different shapes"),
    (dict(client_data=[([[1.0, 2.0], [3.0]], [0, 1])]), "ragged"),
    (dict(client_data=[(X[:10] + 1j, Y[:10])]), "complex"),
    (dict(model=lambda: torch.nn.Linear(4, 2)), "cannot take the sites' records of shape (5,)"),
    (dict(model="mlp"), "model must be a torch.nn.Module or a function"),
    (dict(model=lambda: "not a model"), "returned str, not a torch.nn.Module"),
    (dict(dp="dpsgd", budget_epsilon=50.0, train=lambda m, d: None), "DP-SGD cannot be guaranteed"),
])
def test_bad_own_model_input_is_a_config_error(tmp_path, kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        fed(tmp_path, **kwargs)
    assert fragment in str(info.value)


def test_a_bad_evaluate_hook_answer_is_named(tmp_path):
    with pytest.raises(ConfigError, match="return a dict"):
        fed(tmp_path, evaluate=lambda m: 0.5).run()


def test_a_config_object_is_not_modified(tmp_path):
    cfg = ExperimentConfig(rounds=1, protection="none", out_dir=str(tmp_path / "c"))
    f = Federation(cfg, model=lambda: torch.nn.Linear(5, 2), client_data=SITES)
    assert cfg.model == "logreg" and f.config.model.startswith("custom: ")
    assert f.config.num_clients == 3 and f.config.clients_per_round == 3


def test_an_experiment_toml_can_name_its_own_model_by_import_path(tmp_path, monkeypatch):
    """``model = "package.module:function"``: what a server and its gRPC sites both import."""
    (tmp_path / "hospital_models.py").write_text(
        "import torch\n\ndef make_model():\n    return torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), "
        "torch.nn.Linear(8, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "e.toml"
    path.write_text(f'[model]\nmodel = "hospital_models:make_model"\n[training]\nrounds = 1\nclients_per_round = 3\n'
                    f'[data]\nnum_clients = 3\n[protection]\nprotection = "none"\n[run]\nout_dir = "{tmp_path / "o"}"\n')
    f = Federation(ExperimentConfig.from_toml(path))
    summary = f.run()
    assert summary.num_params == 30 * 8 + 8 + 8 * 2 + 2
    assert 'model = "hospital_models:make_model"' in (tmp_path / "o" / "config.toml").read_text()
    bad = ExperimentConfig.from_toml(path)
    bad.model = "hospital_models:nothing"
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        Federation(bad)


def test_a_saved_custom_config_run_alone_says_what_is_missing(tmp_path):
    fed(tmp_path).run()
    saved = ExperimentConfig.from_toml(tmp_path / "run" / "config.toml")
    saved.out_dir = str(tmp_path / "again")
    with pytest.raises(ConfigError, match="records data or a model passed from Python"):
        Federation(saved)
