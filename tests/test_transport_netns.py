"""Server and clients on different virtual hosts (Linux network namespaces joined by a veth pair).

Needs root and iproute2 (`ip netns`, veth); skipped with the reason otherwise. The
namespaces and links are removed in the fixture's teardown even when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DIM = 100


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = f"sa-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


_WHY_NOT = _netns_unavailable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two namespaces, 'server host' 10.213.x.1 and 'client host' 10.213.x.2, joined by veth."""
    tag = os.getpid() % 10000
    octet = os.getpid() % 250 + 1
    srv, cli = f"sa-srv-{tag}", f"sa-cli-{tag}"
    v0, v1 = f"sav{tag}a", f"sav{tag}b"
    server_ip, client_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    created = []
    try:
        for ns in (srv, cli):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", v0, "type", "veth", "peer", "name", v1)
        _ip("link", "set", v0, "netns", srv)
        _ip("link", "set", v1, "netns", cli)
        _ip("-n", srv, "addr", "add", f"{server_ip}/24", "dev", v0)
        _ip("-n", cli, "addr", "add", f"{client_ip}/24", "dev", v1)
        _ip("-n", srv, "link", "set", v0, "up")
        _ip("-n", cli, "link", "set", v1, "up")
        yield srv, cli, server_ip
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair too
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_server_and_clients_on_different_virtual_hosts(tmp_path, two_hosts, make_pki):
    from federation.transport.config import synthetic_update

    srv, cli, server_ip = two_hosts
    make_pki(tmp_path / "ca", (1, 2, 3), dns=("aggregator.test",), ips=(server_ip,))
    for cid in (1, 2, 3):
        (tmp_path / f"client-{cid}.toml").write_text(
            f'[client]\ncredentials = "ca/client-{cid}"\n[client.input]\nkind = "synthetic"\ndim = {DIM}\n'
        )
    (tmp_path / "server.toml").write_text(
        f'[server]\ncredentials = "ca/server"\nhost = "{server_ip}"\nport = 50443\nprotection = "masking"\n'
        "rounds = 1\nexpected_clients = 3\nthreshold = 2\njoin_timeout = 60\nstage_timeout = 20\n"
        f"[server.options]\ndim = {DIM}\nclip = 100.0\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = []
    try:
        server = subprocess.Popen(
            ["ip", "netns", "exec", srv, sys.executable, "-m", "secagg.cli", "serve", "--config",
             str(tmp_path / "server.toml")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(server)
        for cid in (1, 2, 3):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", cli, sys.executable, "-m", "secagg.cli", "join",
                 "--server", f"{server_ip}:50443", "--config", str(tmp_path / f"client-{cid}.toml"),
                 "--retry", "30"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        out, err = server.communicate(timeout=120)
        assert server.returncode == 0, err[-3000:]
        line = json.loads(out.splitlines()[0])
        assert line["ok"] and line["included"] == [1, 2, 3]
        assert f"client 1 connected from ipv4:{server_ip[:-1]}2" in err  # came from the other host
        expected = sum(synthetic_update(DIM, c, 0).astype(np.float64) for c in (1, 2, 3))
        assert abs(line["norm"] - float(np.linalg.norm(expected))) < 1e-3
        for p in procs[1:]:
            p.communicate(timeout=30)
            assert p.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
