"""Bounded load test: N clients against one `secagg serve` over gRPC + mutual TLS on loopback.

The server is a separate process (its peak resident memory is read from /proc); the clients
run as asyncio tasks in a few worker processes, each with its own TLS connection. Every
mode is measured next to the plain float32 baseline (the server sees every update) in the
same run. Writes benchmarks/results/load_grpc.json.

    python benchmarks/bench_load.py --clients 100 --dim 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def worker(root: str, port: int, ids: list[int]) -> None:
    """Run several clients in one event loop (each its own channel and TLS session)."""
    from federation.transport.certs import Credentials
    from federation.transport.config import synthetic_update
    from federation.transport.grpc_client import ClientSettings, run_client

    dim = int(os.environ["BENCH_DIM"])
    # client 1 holds the CA's key-holder role; every client trusts it for ckks rounds
    settings = ClientSettings(server=f"localhost:{port}", connect_timeout=120, protections=("none", "masking", "ckks"),
                              keyholder=1)

    async def main():
        reports = await asyncio.gather(*[
            run_client(settings, Credentials.load(Path(root) / "ca" / f"client-{c}"),
                       lambda r, c=c: synthetic_update(dim, c, r))
            for c in ids
        ])
        bad = [r.client_id for r in reports if r.lost]
        if bad:
            print(f"clients lost their connection: {bad}", file=sys.stderr)

    asyncio.run(main())


def run_mode(root: Path, label: str, n: int, dim: int, rounds: int, workers: int) -> dict:
    port = free_port()
    mode, _, graph = label.partition("-")
    options = f"dim = {dim}\n"
    if mode == "masking":
        options += f'clip = 1000.0\ngraph = "{graph or "complete"}"\n'
    elif mode == "ckks":
        options += "clip = 100.0\n"
    (root / f"server-{mode}.toml").write_text(
        f'[server]\ncredentials = "ca/server"\nprotection = "{mode}"\nrounds = {rounds}\n'
        f"expected_clients = {n}\nthreshold = {n // 2 + 1}\njoin_timeout = 300\nstage_timeout = 300\n"
        f"max_connections = {n + 16}\n[server.options]\n{options}"
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "secagg.cli", "serve", "--config", str(root / f"server-{mode}.toml"),
         "--port", str(port), "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    peak = [0]

    def poll():
        while server.poll() is None:
            peak[0] = max(peak[0], rss_kib(server.pid, "VmHWM"))
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()
    time.sleep(1.0)
    ids = list(range(1, n + 1))
    env = dict(os.environ, BENCH_DIM=str(dim), PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(root), str(port), ",".join(map(str, part))],
                         cwd=REPO, env=env)
        for part in (ids[i::workers] for i in range(workers))
    ]
    t0 = time.perf_counter()
    lines = []
    for line in server.stdout:
        if line.startswith("{"):
            lines.append(json.loads(line))
            peak[0] = max(peak[0], rss_kib(server.pid, "VmHWM"))
    server.wait()
    wall = time.perf_counter() - t0
    for p in procs:
        p.wait(timeout=120)
    return {
        "mode": label,
        "clients": n, "dim": dim, "rounds": len(lines),
        "all_ok": all(x["ok"] for x in lines),
        "included": [len(x.get("included", [])) for x in lines],
        "round_seconds": [x["seconds"] for x in lines],
        "server_peak_rss_mib": round(peak[0] / 1024, 1),
        "wall_seconds_incl_startup": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--dim", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--modes", default="none,masking-complete",
                    help="comma-separated: none (the unprotected baseline, always run), masking-complete, masking-sparse, ckks")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "load_grpc.json"))
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        root, port, ids = args.worker
        worker(root, int(port), [int(x) for x in ids.split(",")])
        return
    from federation.transport.certs import init_ca, issue

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        init_ca(root / "ca")
        issue(root / "ca", server=True)
        for c in range(1, args.clients + 1):
            issue(root / "ca", client_id=c, role="keyholder" if c == 1 else "client")
        cert_seconds = time.perf_counter() - t
        modes = ["none"] + [m for m in args.modes.split(",") if m and m != "none"]
        results = [run_mode(root, m, args.clients, args.dim, args.rounds, args.workers) for m in modes]
    report = {
        "benchmark": "grpc-mtls-loopback-load",
        "command": "python benchmarks/bench_load.py " + " ".join(
            f"--{k} {v}" for k, v in (("clients", args.clients), ("dim", args.dim), ("rounds", args.rounds),
                                      ("workers", args.workers), ("modes", args.modes))),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "certificate_issue_seconds": round(cert_seconds, 2),
        "baseline": "none: float32 updates in the clear, summed by the server (insecure)",
        "note": "round_seconds: from the first server message to the released sum (connection set-up excluded); server and clients share the same CPUs",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
