"""Connecting to Ray: new local Ray by default, existing clusters by address, token auth, clear refusals.

The fast tests check the decisions (what ``ray.init`` is given); the slow test starts a
token-authenticated ``ray start --head`` cluster on loopback, runs ``secagg serve --backend
ray --ray-address`` against it without RAY_AUTH_MODE set, and stops the cluster's own
process group. The cluster's workers run in a bare virtual environment that has Ray and
the third-party dependencies but not this package (as a real node would), so the round
only completes if the job's runtime_env ships the package; a control job without it
checks that the workers indeed cannot import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from federation.transport.ray_cluster import AUTH_MODE, init_kwargs, token_available
from secagg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_no_address_starts_a_new_local_ray_never_joins():
    kw = init_kwargs(None, 2, env={})
    assert kw["address"] == "local" and kw["num_cpus"] == 2  # "local": a new instance even if one runs


def test_ray_client_addresses_and_num_cpus_on_a_cluster_are_refused():
    with pytest.raises(ConfigError, match="Ray Client addresses .* are not supported"):
        init_kwargs("ray://127.0.0.1:10001", None, env={})
    with pytest.raises(ConfigError, match="--num-cpus applies to a local Ray only"):
        init_kwargs("127.0.0.1:6379", 4, env={})


def test_token_auth_is_enabled_for_an_explicit_address_when_a_token_exists(tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef" * 2)
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    kw = init_kwargs("127.0.0.1:6379", None, env=env)
    assert env[AUTH_MODE] == "token"
    import federation
    import privacy
    import secagg

    assert kw["runtime_env"] == {"py_modules": [secagg, federation, privacy]}  # the package ships to workers
    env = {"RAY_AUTH_TOKEN_PATH": str(token), AUTH_MODE: "disabled"}  # an explicit choice is kept
    init_kwargs("127.0.0.1:6379", None, env=env)
    assert env[AUTH_MODE] == "disabled"
    env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}
    init_kwargs("127.0.0.1:6379", None, env=env)
    assert AUTH_MODE not in env and not token_available(env)
    assert token_available({"RAY_AUTH_TOKEN": "abc"})


def _server_toml(tmp_path: Path) -> Path:
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        '[server]\ncredentials = "unused-with-ray"\nprotection = "masking"\nrounds = 1\n'
        'expected_clients = 6\nthreshold = 4\n[server.options]\ndim = 20\nclip = 100.0\n'
    )
    return cfg


def test_serve_refuses_ray_client_address_with_a_clear_error(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'secagg[ray]')")
    from secagg.cli import main

    cfg = _server_toml(tmp_path)
    assert main(["serve", "--config", str(cfg), "--backend", "ray", "--ray-address", "ray://127.0.0.1:1"]) == 1
    assert "Ray Client addresses" in capsys.readouterr().err
    assert main(["serve", "--config", str(cfg), "--backend", "ray", "--ray-address", "127.0.0.1:1",
                 "--num-cpus", "2"]) == 1
    assert "--num-cpus applies to a local Ray only" in capsys.readouterr().err


SHIPPED_PROBE = """
import sys, ray
from federation.transport.ray_cluster import connect
connect(sys.argv[1])

@ray.remote
def shipped():
    import secagg
    return secagg.__file__

print(ray.get(shipped.remote()))
"""

# The same job without the runtime_env: the workers must fail to import the package.
UNSHIPPED_PROBE = """
import sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)

@ray.remote(max_retries=0)
def importable():
    try:
        import secagg
    except ImportError:
        return False
    return True

print("IMPORTABLE" if ray.get(importable.remote()) else "NOT-IMPORTABLE")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_venv(root: Path) -> Path:
    """A virtual environment like a cluster node's: Ray and the third-party packages of this
    one (its site-packages on the path through a .pth line, which does not run the .pth
    files there, so the editable install of secagg is not seen), but not this package."""
    import site
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    (site_packages,) = root.glob("lib/python*/site-packages")
    (site_packages / "node_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root / "bin" / "python"


@pytest.mark.slow
def test_serve_against_a_token_authenticated_ray_cluster(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'secagg[ray]')")
    token = tmp_path / "auth_token"
    token.write_text(os.urandom(16).hex())
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's unix sockets need a short path
    node_python = _node_venv(tmp_path / "node-venv")
    head_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    head_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    work = tmp_path / "work"  # the drivers' cwd (Ray puts it on the workers' path): no package there
    work.mkdir()
    head = subprocess.Popen(
        [str(node_python), "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
         "--temp-dir", temp_dir],
        env=head_env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        driver_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        driver_env.update(RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "secagg", "serve", "--config", str(_server_toml(tmp_path)),
               "--backend", "ray", "--ray-address", f"127.0.0.1:{port}", "--clients", "6", "--seed", "1"]
        deadline = time.monotonic() + 120
        while True:  # the head needs a while to come up on a busy machine
            run = subprocess.run(cmd, env=driver_env, cwd=work, capture_output=True, text=True, timeout=300, check=False)
            if run.returncode == 0 or time.monotonic() > deadline or head.poll() is not None:
                break
            time.sleep(3)
        assert run.returncode == 0, run.stderr[-3000:]
        (line,) = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
        assert line["round"] == 0 and line["included"] == 6
        # the workers import the copy the job's runtime_env shipped, not a local install
        probe = subprocess.run([sys.executable, "-c", SHIPPED_PROBE, f"127.0.0.1:{port}"], env=driver_env,
                               cwd=work, capture_output=True, text=True, timeout=300, check=False)
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert "runtime_resources" in probe.stdout and "py_modules" in probe.stdout, probe.stdout
        # control: without the runtime_env the same workers cannot import the package at all
        control = subprocess.run([sys.executable, "-c", UNSHIPPED_PROBE, f"127.0.0.1:{port}"],
                                 env=dict(driver_env, RAY_AUTH_MODE="token"), cwd=work, capture_output=True,
                                 text=True, timeout=300, check=False)
        assert "NOT-IMPORTABLE" in control.stdout, control.stdout + control.stderr[-3000:]
        # without the token, the same cluster refuses the driver (and says why)
        no_token = dict(driver_env, RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"), HOME=str(tmp_path))
        denied = subprocess.run(cmd, env=no_token, cwd=work, capture_output=True, text=True, timeout=300, check=False)
        assert denied.returncode != 0
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(head: subprocess.Popen) -> None:
    """Stop the cluster this test started: its own process group (``start_new_session``), and only it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(2)  # let raylet and GCS exit on their own after the SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
