"""Multi-process deployment on loopback: `secagg serve` and `secagg join` as separate processes.

* one server and six client processes run masking rounds, then CKKS rounds, over gRPC
  with mutual TLS; one client process is SIGKILLed mid-round (masking: after it shared
  its keys, before its masked input; ckks: before its upload), and the round completes
  with the other five;
* the server is SIGKILLed after its first round and restarted: it resumes from its state
  directory, the clients reconnect on their own, and no round is run twice.

Run as a script, this file is the client that kills itself mid-round:
``python tests/test_transport_multiprocess.py CONFIG SERVER DIE_AFTER_PAYLOADS``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DIM = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def secagg(*args: str) -> list[str]:
    return [sys.executable, "-m", "secagg.cli", *args]


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def make_deployment(make_pki, root: Path, n_clients: int, *, rounds: int, expected: int, threshold: int,
                    state: bool = False, protection: str = "masking", extra_options: str = "") -> Path:
    make_pki(root / "ca", range(1, n_clients + 1), keyholders=(1,))
    for cid in range(1, n_clients + 1):
        (root / f"client-{cid}.toml").write_text(
            f'[client]\ncredentials = "ca/client-{cid}"\nkeyholder = 1\n'
            f'[client.input]\nkind = "synthetic"\ndim = {DIM}\nseed = {cid}\n'
        )
    (root / "server.toml").write_text(
        "[server]\n"
        'credentials = "ca/server"\n'
        f'protection = "{protection}"\nrounds = {rounds}\nexpected_clients = {expected}\nthreshold = {threshold}\n'
        "join_timeout = 60\nrejoin_timeout = 1.5\nstage_timeout = 20\n"
        + ('state_dir = "state"\n' if state else "")
        + f"[server.options]\ndim = {DIM}\nclip = 100.0\n{extra_options}"
    )
    return root


def expected_sum(cids, rnd: int) -> np.ndarray:
    from federation.transport.config import synthetic_update

    return sum(synthetic_update(DIM, c, rnd).astype(np.float64) for c in cids)


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# payloads the killed client takes before it dies: masking -> after sharing its keys, before
# its masked input (the server must recover its pairwise masks); ckks -> on the public
# context, before its upload (it is left out of the encrypted sum).
DIE_AFTER = {"masking": 3, "ckks": 1}


@pytest.mark.parametrize("mode", ["masking", "ckks"])
def test_server_and_six_client_processes_one_killed_mid_round(tmp_path, procs, make_pki, mode):
    if mode == "ckks":
        pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    root = make_deployment(make_pki, tmp_path, 6, rounds=2, expected=6, threshold=4, protection=mode)
    port = free_port()
    server = subprocess.Popen(
        secagg("serve", "--config", str(root / "server.toml"), "--port", str(port)),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    procs.append(server)
    clients = []
    for cid in range(1, 6):
        p = subprocess.Popen(
            secagg("join", "--server", f"localhost:{port}", "--config", str(root / f"client-{cid}.toml"),
                   "--retry", "20"),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(p)
        clients.append(p)
    dying = subprocess.Popen(
        [sys.executable, __file__, str(root / "client-6.toml"), f"localhost:{port}", str(DIE_AFTER[mode])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    procs.append(dying)
    out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-3000:]
    dying.wait(timeout=30)
    assert dying.returncode == -signal.SIGKILL
    r0, r1 = lines(out)
    assert r0["ok"] and r0["included"] == [1, 2, 3, 4, 5]
    assert list(r0["dropped"]) == ["6"] and r0["dropped"]["6"].startswith("disconnected")
    assert re.search(r"dropped client 6 \(ipv[46]:\S+\): disconnected", err)  # with the peer address
    assert r1["ok"] and r1["included"] == [1, 2, 3, 4, 5]
    for p in clients:
        cout, cerr = p.communicate(timeout=30)
        assert p.returncode == 0, cerr[-2000:]
        got = {d["round"]: d for d in lines(cout)}
        assert got[0]["ok"] and got[1]["ok"]
        for rnd in (0, 1):
            np.testing.assert_allclose(got[rnd]["norm"], np.linalg.norm(expected_sum(range(1, 6), rnd)), rtol=1e-6)
    assert abs(r0["norm"] - float(np.linalg.norm(expected_sum(range(1, 6), 0)))) < 1e-3


def test_server_killed_and_restarted_resumes_from_its_state(tmp_path, procs, make_pki):
    root = make_deployment(make_pki, tmp_path, 3, rounds=3, expected=3, threshold=2, state=True)
    port = free_port()
    serve = secagg("serve", "--config", str(root / "server.toml"), "--port", str(port))
    server = subprocess.Popen(serve, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(server)
    clients = []
    for cid in range(1, 4):
        p = subprocess.Popen(
            secagg("join", "--server", f"localhost:{port}", "--config", str(root / f"client-{cid}.toml"),
                   "--retry", "60", "--out", str(root / f"out-{cid}")),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(p)
        clients.append(p)
    first = json.loads(server.stdout.readline())
    assert first["round"] == 0 and first["ok"]
    server.send_signal(signal.SIGKILL)  # crash right after round 0 was recorded
    server.wait(timeout=10)
    time.sleep(0.5)
    restarted = subprocess.Popen(serve, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(restarted)
    out, err = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, err[-3000:]
    assert "resuming: rounds up to 0 are complete" in err
    assert [d["round"] for d in lines(out)] == [1, 2]
    state = root / "state"
    assert json.loads((state / "progress.json").read_text()) == {"completed": 2}
    assert [json.loads(x)["round"] for x in (state / "rounds.jsonl").read_text().splitlines()] == [0, 1, 2]
    for rnd in range(3):
        np.testing.assert_allclose(np.load(state / f"round-{rnd}.npy"), expected_sum(range(1, 4), rnd), atol=1e-3)
    for cid, p in enumerate(clients, start=1):
        cout, cerr = p.communicate(timeout=60)
        assert p.returncode == 0, cerr[-2000:]
        # round 0's aggregate may or may not have reached a client before the crash
        assert {1, 2} <= {d["round"] for d in lines(cout) if d.get("ok")}
        np.testing.assert_allclose(np.load(root / f"out-{cid}" / "round-2.npy"), np.load(state / "round-2.npy"))


def _dying_client_main(config: str, server: str, die_after: int) -> None:
    """A client that SIGKILLs itself when the ``die_after``-th protocol payload arrives."""
    import asyncio

    from federation.transport.certs import Credentials
    from federation.transport.config import input_source, load_client_config
    from federation.transport.grpc_client import run_client
    from secagg.rounds import get_mode

    cfg = load_client_config(config)
    cfg.settings.server = server
    creds = Credentials.load(cfg.credentials)
    source = input_source(cfg.input, cfg.base, creds.check_binding().client_id)
    seen = 0

    def make_round(mode, ctx, params):
        inner = get_mode(mode).client(ctx, params)

        class Dying:
            done = False

            def receive(self, payload):
                nonlocal seen
                seen += 1
                if seen >= die_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                return inner.receive(payload)

        return Dying()

    asyncio.run(run_client(cfg.settings, creds, source, make_round=make_round))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _dying_client_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
