"""Scale benchmark: one in-process masking round at many clients, with where the time goes.

Prints one JSON object: the round's wall time split into the server's and the clients'
work per stage (every client's time summed, not a mean), the AES-256-CTR keystream rate
measured in the same run (warm median) and the keystream the server's unmasking has to
generate, so its time reads as a multiple of that limit. It also counts the round's pairwise
key agreements (two per ordered neighbour pair on the clients' side, one per rebuilt mask on
the server's) and prices them at the per-agreement time measured in the same run: the
round's compute floor. With ``--profile`` it also lists the functions that took the most
time (cProfile, which inflates Python-heavy code; this process only). ``--processes 2``
runs the clients in two worker processes (:class:`secagg.protocol.simulate.ProcessRound`);
the round's CPU time then adds the workers' (their start-up included).

    python benchmarks/bench_scale.py --clients 1000 --dim 1e4 --graph complete
    python benchmarks/bench_scale.py --clients 1000 --dim 1e4 --graph sparse --profile
    python benchmarks/bench_scale.py --clients 1000 --dim 1e4 --graph sparse --processes 2
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import time

import numpy as np

from secagg.bench.timing import agreement_seconds, keystream_rate, round_floor, warm_median
from secagg.encoding import FixedPointCodec
from secagg.protocol.common import Stage
from secagg.protocol.simulate import InMemoryRound, ProcessRound


def run(clients: int, dim: int, graph: str, dropout: float, profile: bool, workers: int = 1,
        processes: int = 1) -> dict:
    updates = np.random.default_rng(0).uniform(-1, 1, size=(clients, dim)).astype(np.float32)  # benchmark data
    rate = keystream_rate()
    per_agreement = agreement_seconds()
    # the same two baselines in CPU time, to price the round's CPU time on a shared machine
    rate_cpu = keystream_rate(clock=time.process_time)
    per_agreement_cpu = agreement_seconds(count=2000, clock=time.process_time)
    plain = warm_median(lambda: updates.sum(axis=0, dtype=np.float32))
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=clients, clip_mode="coordinate")
    n_drop = int(round(dropout * clients))
    dropped = [c + 1 for c in np.linspace(0, clients - 1, n_drop, dtype=int).tolist()] if n_drop else []
    started = time.perf_counter()
    if processes > 1:
        session = ProcessRound(updates, codec, graph=graph, dropout_hint=dropout, workers=workers, processes=processes)
    else:
        session = InMemoryRound(updates, codec, graph=graph, dropout_hint=dropout, workers=workers)
    setup_s = time.perf_counter() - started
    profiler = cProfile.Profile() if profile else None
    started, cpu_started, children_started = time.perf_counter(), time.process_time(), _children_cpu()
    if profiler:
        profiler.enable()
    session.run({Stage.MASKED_INPUT.value: dropped})
    if profiler:
        profiler.disable()
    round_s, round_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    workers_cpu_s = _children_cpu() - children_started  # the worker processes, joined when the round ended
    server = session.server
    exact = updates[[c - 1 for c in server.included]].astype(np.float64).sum(axis=0)
    g = session.server.graph
    survivors = frozenset(server.included)
    lost = set(server.dropped_at.get(Stage.MASKED_INPUT.value, ()))
    masks = len(survivors) + sum(len(g.neighbours(o) & survivors) for o in lost)
    server_keystream = masks * dim * 4
    unmask_s = server.timings.get("server.unmask", 0.0)
    # every client here shares; the dropped ones vanish at the masked-input stage
    agreements, keystream = round_floor(g, session.client_ids, lost, survivors, dim)
    floor_cpu = agreements * per_agreement_cpu + keystream / rate_cpu
    row = {
        "clients": clients, "dim": dim, "graph": "complete" if g.complete else "sparse",
        "degree": session.config.degree, "workers": workers, "processes": processes,
        "threshold": session.config.threshold, "dropped": len(lost),
        "round_wall_s": round_s, "round_cpu_s (what a loaded machine distorts least)": round_cpu_s + workers_cpu_s,
        "round_cpu_s of this process": round_cpu_s,
        "round_cpu_s of the worker processes (start-up included)": workers_cpu_s,
        "round_agreements (clients' + server's)": agreements,
        "round_mask_keystream_bytes": keystream,
        "agreement_cpu_s (X25519 + HKDF, warm median of CPU time, same run)": per_agreement_cpu,
        "aes256_ctr_bytes_per_cpu_s": rate_cpu,
        "round_floor_cpu_s (agreements x agreement_cpu_s + keystream / its CPU rate)": floor_cpu,
        "round_cpu_over_floor": (round_cpu_s + workers_cpu_s) / floor_cpu,
        "round_floor_wall_s on 2 free cores (floor_cpu / 2)": floor_cpu / 2,
        "setup_s (identity keys, not part of a round)": setup_s,
        "server_stage_s": {k: v for k, v in server.timings.items()},
        "server_receive_s": session.server_receive_seconds,
        "server_total_s": sum(v for k, v in server.timings.items() if k.count(".") == 1
                              and k.split(".")[1] in {s.value for s in Stage}) + sum(session.server_receive_seconds.values()),
        "clients_total_s": session.client_total_seconds,
        "clients_time_is": "the workers' CPU seconds" if processes > 1 else "each party's wall seconds, summed",
        "clients_all_stages_s": sum(session.client_total_seconds.values()),
        "aes256_ctr_bytes_per_s": rate,
        "server_unmask_keystream_bytes": server_keystream,
        "server_unmask_keystream_limit_s": server_keystream / rate,
        "server_unmask_over_limit": unmask_s / (server_keystream / rate),
        "agreement_s (X25519 + HKDF, warm median, same run)": per_agreement,
        "server_unmask_agreements": masks - len(survivors),
        "server_unmask_floor_s (keystream limit + its agreements)": server_keystream / rate
        + (masks - len(survivors)) * per_agreement,
        "server_unmask_over_floor": unmask_s / (server_keystream / rate + (masks - len(survivors)) * per_agreement),
        "plain_sum_s (warm median)": plain,
        "max_abs_error": float(np.max(np.abs(server.result - exact))),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if profiler:
        stats = pstats.Stats(profiler)
        top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]
        row["profile_tottime_top"] = [
            (f"{os.path.basename(f)}:{line}:{name}", round(tt, 3)) for (f, line, name), (_, _, tt, _, _) in top
        ]
    return row


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--dim", type=float, default=1e4)
    parser.add_argument("--graph", choices=["complete", "sparse"], default="complete")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="fraction of clients that never deliver their masked vector (default 0.1)")
    parser.add_argument("--profile", action="store_true", help="also list the top functions by own time")
    parser.add_argument("--workers", type=int, default=1,
                        help="threads each party may use to expand masks (default 1: serial; results are identical)")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes hosting the clients (default 1: all in this process; same sum)")
    args = parser.parse_args()
    print(json.dumps(run(args.clients, int(args.dim), args.graph, args.dropout, args.profile, args.workers,
                         args.processes), indent=1))


if __name__ == "__main__":
    main()
