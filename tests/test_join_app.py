"""``secagg join --app module:function``: each site trains on its own private data over gRPC.

A real loopback server (the federation engine with mutual TLS, masking) and three
``secagg join`` commands run in this process; each site's records come only from its own
``--app`` function, which the server never sees.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("grpc")
pytest.importorskip("sklearn")

SITE_APP = '''
from federation.data import load_dataset

CALLS = []


def _site(i):
    CALLS.append(i)
    data = load_dataset("breast_cancer")            # stands in for the site's own database
    return data.x_train[i::3], data.y_train[i::3]


def site1():
    return _site(0)


def site2():
    return _site(1)


def site3():
    return _site(2)


def tiny():
    data = load_dataset("breast_cancer")
    return data.x_train[:3], data.y_train[:3]


def wrong_shape():
    data = load_dataset("breast_cancer")
    return data.x_train[:50, :7], data.y_train[:50]


def broken():
    raise OSError("database unreachable")
'''

EXPERIMENT = (
    '[data]\ndataset = "breast_cancer"\nnum_clients = 3\n'
    "[training]\nrounds = 2\nclients_per_round = 3\nbatch_size = 16\nlr = 0.1\n"
    '[protection]\nprotection = "masking"\nupdate_clip = 5.0\n'
    '[run]\nname = "sites"\nout_dir = "{out}"\n'
)


@pytest.fixture
def site(tmp_path, monkeypatch):
    (tmp_path / "site_app.py").write_text(SITE_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "experiment.toml").write_text(EXPERIMENT.format(out=tmp_path / "run"))
    import importlib

    import site_app

    importlib.reload(site_app)
    return tmp_path


def test_sites_train_on_their_own_data_over_grpc(site, make_pki):
    from federation.config import ExperimentConfig
    from federation.transport.certs import Credentials
    from federation.transport.grpc_server import ServerSettings
    from federation.transport.training import GrpcFederation
    from secagg.cli import main

    make_pki(site / "ca", (1, 2, 3))
    for cid in (1, 2, 3):
        (site / f"client-{cid}.toml").write_text(
            f'[client]\ncredentials = "ca/client-{cid}"\n[client.training]\nexperiment = "experiment.toml"\n')
    settings = ServerSettings(expected_clients=3, threshold=2, join_timeout=120, rejoin_timeout=30,
                              stage_timeout=60)
    fed = GrpcFederation(ExperimentConfig.from_toml(site / "experiment.toml"), settings,
                         Credentials.load(site / "ca" / "server"))
    codes: dict[int, int] = {}

    def join(cid: int) -> None:
        codes[cid] = main(["join", "--server", f"localhost:{fed.port}", "--config", str(site / f"client-{cid}.toml"),
                           "--app", f"site_app:site{cid}", "--log-level", "WARNING"])

    threads = [threading.Thread(target=join, args=(cid,), daemon=True) for cid in (1, 2, 3)]
    for t in threads:
        t.start()
    try:
        summary = fed.run()
    finally:
        fed.close()
    for t in threads:
        t.join(timeout=120)
    import site_app

    assert codes == {1: 0, 2: 0, 3: 0}
    assert sorted(site_app.CALLS) == [0, 1, 2]  # every site loaded its own records, once
    assert [r.included for r in summary.rounds] == [[1, 2, 3], [1, 2, 3]]
    assert all(r.aborted is None for r in summary.rounds)
    assert summary.final_accuracy > 0.8


def _client_args(site, make_pki, app):
    make_pki(site / "ca", (1,))
    (site / "client-1.toml").write_text(
        '[client]\ncredentials = "ca/client-1"\n[client.training]\nexperiment = "experiment.toml"\n')
    return ["join", "--server", "localhost:1", "--config", str(site / "client-1.toml"), "--app", app]


@pytest.mark.parametrize(("app", "fragment"), [
    ("site_app", "--app expects package.module:function"),
    ("no_such_module:load", "cannot import 'no_such_module'"),
    ("site_app:nothing", "has no 'nothing'"),
    ("site_app:broken", "failed: OSError: database unreachable"),
    ("site_app:wrong_shape", "the site's records have shape (7,) but the experiment's model takes (30,)"),
])
def test_a_bad_app_is_one_line_before_connecting(site, make_pki, capsys, app, fragment):
    from secagg.cli import main

    assert main(_client_args(site, make_pki, app)) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_a_dp_site_whose_spend_the_ledger_would_understate_is_refused(site):
    """Under DP-SGD a site with far fewer records samples each at a higher rate than the
    server's ledger accounts for: it refuses to train rather than spend more than stated."""
    from federation.config import ExperimentConfig
    from federation.custom import site_data
    from federation.transport.training import TrainingClient
    from secagg.errors import ConfigError

    config = ExperimentConfig.from_toml(site / "experiment.toml")
    config.dp, config.budget_epsilon = "dpsgd", 50.0
    x, y = site_data("site_app:tiny")
    with pytest.raises(ConfigError, match="spend would be understated"):
        TrainingClient(config, 0, x=x, y=y)
    x, y = site_data("site_app:site1")  # a partition-sized site is accounted for
    client = TrainingClient(config, 0, x=x, y=y)
    assert np.array_equal(client.y, y)
