"""Peak resident memory of a gRPC masking server in one round, against its documented bound.

The server runs in a process of its own; its idle baseline (VmHWM after start, with the
masking mode imported) is read in that process before any client connects, its peak
(VmHWM) after the round. The clients run in this process. Printed beside the peak: the
baseline, the running sum (4 B x d), the bound ``server_memory_bound(n, d)`` of
docs/deployment.md and the ratios:

    python benchmarks/bench_server_memory.py --clients 4 --dim 4194304
    python benchmarks/bench_server_memory.py --clients 5 --dim 1.1e8 --inflight 1 --no-share-result
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SERVER = """
import asyncio, json, sys
from pathlib import Path

import secagg.protocol.mode  # imported before the baseline: the round needs it
from federation.transport.certs import Credentials
from federation.transport.grpc_server import AggregationServer, ServerSettings


def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10


async def main():
    server = AggregationServer(ServerSettings(**json.loads(sys.argv[2])), Credentials.load(Path(sys.argv[1])))
    port = await server.start()
    print(json.dumps({"port": port, "baseline": hwm()}), flush=True)
    reports = await server.serve()
    peak = hwm()
    await server.stop(0)
    print(json.dumps({"ok": [r.ok for r in reports], "peak": peak, "round_s": [r.seconds for r in reports]}),
          flush=True)


asyncio.run(main())
"""


def measure(clients: int, dim: int, inflight: int | None, root: Path, share_result: bool = True) -> dict:
    from federation.transport.certs import Credentials, init_ca, issue
    from federation.transport.grpc_client import ClientSettings, run_client
    from federation.transport.grpc_server import ServerSettings, server_memory_bound
    from secagg.protocol.mode import payload_limit

    init_ca(root / "ca")
    issue(root / "ca", server=True)
    for c in range(1, clients + 1):
        issue(root / "ca", client_id=c)
    message = payload_limit(clients, dim, masked=True) + (1 << 20)
    options = {"mode": "masking", "options": {"dim": dim, "clip": 1e4, "clip_mode": "coordinate"},
               "expected_clients": clients, "threshold": clients - 1, "rounds": 1, "join_timeout": 600.0,
               "stage_timeout": 600.0, "max_message_bytes": max(message, 256 << 20), "share_result": share_result}
    if inflight is None:
        inflight = ServerSettings().max_inflight_bytes  # the default budget, which the bound must use
    options["max_inflight_bytes"] = inflight
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(root / "ca" / "server"), json.dumps(options)],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(server.stdout.readline())
        settings = ClientSettings(server=f"localhost:{started['port']}", connect_timeout=120,
                                  max_message_bytes=max(message, 8 * dim + (1 << 20)))

        async def run_all():
            return await asyncio.gather(*[
                run_client(settings, Credentials.load(root / "ca" / f"client-{c}"),
                           lambda r, c=c: np.full(dim, c, dtype=np.float32))
                for c in range(1, clients + 1)
            ])

        t0 = time.perf_counter()
        asyncio.run(run_all())
        wall = time.perf_counter() - t0
        finished = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait(timeout=60)
    bound = server_memory_bound(clients, dim, inflight=inflight)
    grown = finished["peak"] - started["baseline"]
    return {
        "clients": clients, "dim": dim, "max_inflight_bytes": inflight, "share_result": share_result,
        "ok": finished["ok"],
        "server_baseline_bytes (idle, same process)": started["baseline"],
        "server_peak_bytes": finished["peak"],
        "grown_bytes": grown,
        "bound_bytes (server_memory_bound)": bound,
        "grown_over_bound": grown / bound,
        "sum_bytes (4 B x d)": 4 * dim,
        "peak_over_sum": finished["peak"] / (4 * dim),
        "round_s": finished["round_s"], "clients_wall_s": wall,
        "load_avg": os.getloadavg(), "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--dim", type=float, default=1 << 22)
    parser.add_argument("--inflight", type=float, default=None,
                        help="the server's max_inflight_bytes, in uploads of this size (default: the server's default)")
    parser.add_argument("--no-share-result", action="store_true",
                        help="the server does not send the aggregate back (saves the clients 8 B x d each)")
    args = parser.parse_args()
    from secagg.protocol.mode import payload_limit

    dim = int(args.dim)
    inflight = None if args.inflight is None else int(args.inflight * payload_limit(args.clients, dim, masked=True))
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(args.clients, dim, inflight, Path(tmp), not args.no_share_result), indent=1))


if __name__ == "__main__":
    main()
