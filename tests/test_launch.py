"""The library functions the command line calls: options, backend choice, the client's policy."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from federation.config import ExperimentConfig
from federation.engine import Federation
from federation.launch import apply_options, open_federation
from secagg.errors import ConfigError


def config(tmp_path, **options) -> ExperimentConfig:
    base = {"dataset": "breast_cancer", "num_clients": 4, "clients_per_round": 4, "rounds": 1,
            "protection": "masking", "out_dir": str(tmp_path / "run")}
    base.update(options)
    return ExperimentConfig.from_dict(base)


def test_options_and_key_value_texts_override_the_config(tmp_path):
    cfg = config(tmp_path)
    apply_options(cfg, {"rounds": 3, "lr": None}, ["lr=0.05", "protection = ckks"])
    assert (cfg.rounds, cfg.lr, cfg.protection) == (3, 0.05, "ckks")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_options(cfg, {}, ["lr"])
    with pytest.raises(ConfigError):
        apply_options(cfg, {"no_such_option": 1})


def test_in_process_backend_is_the_engine_and_unknown_backends_are_refused(tmp_path):
    with open_federation(config(tmp_path)) as fed:
        assert type(fed) is Federation
    with pytest.raises(ConfigError, match="backend 'grpc' is not one of inprocess, ray"), \
            open_federation(config(tmp_path), backend="grpc"):
        pass


def test_the_recommender_runs_in_process_only(tmp_path):
    shops = config(tmp_path, dataset="shops", partition="natural", model="mf", num_clients=4, threshold=3)
    with pytest.raises(ConfigError, match="--backend inprocess"), open_federation(shops, backend="ray"):
        pass


def test_a_training_client_accepts_only_its_experiments_protection(tmp_path):
    pytest.importorskip("grpc")
    from federation.transport.config import load_client_config
    from federation.transport.join import accepted_protections

    (tmp_path / "client.toml").write_text('[client]\ncredentials = "c"\nprotections = ["masking", "none"]\n'
                                          '[client.input]\nkind = "synthetic"\ndim = 4\n')
    client = load_client_config(tmp_path / "client.toml")
    assert accepted_protections(client) == ("masking", "none")  # contributing its own input: its own list
    for protection, served in [("masking", "masking"), ("masking-sparse", "masking"), ("ckks", "ckks"),
                               ("none", "none")]:
        assert accepted_protections(client, config(tmp_path, protection=protection)) == (served,)


def test_the_old_keys_mode_and_modes_still_load_with_a_warning(tmp_path):
    """The server and client files say `protection(s)`, as the experiment config does."""
    pytest.importorskip("grpc")
    from federation.transport.config import load_client_config, load_server_config

    (tmp_path / "server.toml").write_text('[server]\ncredentials = "s"\nmode = "ckks"\n')
    (tmp_path / "client.toml").write_text('[client]\ncredentials = "c"\nmodes = ["ckks"]\n')
    with pytest.warns(FutureWarning, match="`mode` is now called `protection`"):
        assert load_server_config(tmp_path / "server.toml").settings.protection == "ckks"
    with pytest.warns(FutureWarning, match="`modes` is now called `protections`"):
        assert load_client_config(tmp_path / "client.toml").settings.protections == ("ckks",)
    (tmp_path / "both.toml").write_text('[server]\ncredentials = "s"\nmode = "ckks"\nprotection = "masking"\n')
    with pytest.raises(ConfigError, match="keep `protection`"):
        load_server_config(tmp_path / "both.toml")


def test_the_old_name_plain_still_loads_as_none_with_a_warning(tmp_path):
    pytest.importorskip("grpc")
    from federation.transport.config import load_client_config, load_server_config

    (tmp_path / "server.toml").write_text('[server]\ncredentials = "s"\nprotection = "plain"\n[server.options]\ndim = 4\n')
    (tmp_path / "client.toml").write_text('[client]\ncredentials = "c"\nprotections = ["plain"]\n')
    with pytest.warns(FutureWarning, match='"plain" is now called "none"'):
        assert load_server_config(tmp_path / "server.toml").settings.protection == "none"
    with pytest.warns(FutureWarning, match='write "none"'):
        assert load_client_config(tmp_path / "client.toml").settings.protections == ("none",)
