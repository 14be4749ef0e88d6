"""1,000 simulated clients on Ray actors, sparse SecAgg+ (Bell et al. 2020), on this machine.

Clients live in a few Ray actors (one per CPU by default); the server session runs in the
driver. Reports round time, the SecAgg+ degree/threshold, upload size, driver and actor
peak memory, and in the same run the plain float32 sum of the same updates (baseline)
and, with --compare-in-process, the in-process engine on the same updates and seed (the
totals must be identical). CPU seconds are reported beside wall seconds (the driver's and
every actor process's, Ray's own work included; the in-process round's): on a shared
machine the wall time follows the load, the CPU time much less, and Ray CPU / in-process
CPU is what the Ray link costs. The round's compute floor (its key agreements and mask keystream, priced at
their CPU cost measured in the same run, as in bench_scale.py) is reported beside it.
Writes benchmarks/results/ray_sparse.json.

    python benchmarks/bench_ray.py --clients 1000 --dim 10000 --num-cpus 2 --compare-in-process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--actors", type=int, default=None, help="client-pool actors (default: one per CPU)")
    ap.add_argument("--dropout", type=float, default=0.05, help="fraction of clients that vanish before uploading")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--compare-in-process", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ray_sparse.json"))
    args = ap.parse_args()

    import ray

    import secagg
    from federation.transport.ray_backend import _peak_rss_kib, make_pools, run_ray_round, start_ray
    from secagg.bench.timing import agreement_seconds, keystream_rate, round_floor

    n, d = args.clients, args.dim
    rng = np.random.default_rng(args.seed)
    updates = rng.normal(0, 0.1, (n, d))
    dropped_rows = sorted(rng.choice(n, int(args.dropout * n), replace=False).tolist())
    t = time.perf_counter()
    plain = updates[[i for i in range(n) if i not in set(dropped_rows)]].astype(np.float32).sum(axis=0)
    plain_s = time.perf_counter() - t

    per_agreement_cpu = agreement_seconds(count=2000, clock=time.process_time)
    rate_cpu = keystream_rate(clock=time.process_time)
    t = time.perf_counter()
    start_ray(num_cpus=args.num_cpus)
    ray_start_s = time.perf_counter() - t
    t = time.perf_counter()
    pools = make_pools(tuple(range(1, n + 1)), num_actors=args.actors, seed=args.seed)
    ray.get([p.client_ids.remote() for p, _ in pools])
    actors_s = time.perf_counter() - t
    options = {"clip": 100.0, "graph": "sparse", "dropout": max(args.dropout, 0.01)}
    rounds = []
    total = None
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        actor_cpu = ray.get([p.cpu_seconds.remote() for p, _ in pools])
        driver_cpu = time.process_time()
        res = run_ray_round(updates, options=options, seed=args.seed, round_=r, pools=pools,
                            dropouts={"masked_input": [i + 1 for i in dropped_rows]})
        driver_cpu = time.process_time() - driver_cpu
        actor_cpu = [b - a for a, b in zip(actor_cpu, ray.get([p.cpu_seconds.remote() for p, _ in pools]))]
        total = res["outcome"].total
        keep = ("round_seconds", "setup_seconds", "client_cpu_seconds", "degree", "threshold",
                "upload_bytes_per_param", "masked_input_bytes_per_param")
        line = {k: round(res[k], 3) if isinstance(res[k], float) else res[k] for k in keep}
        line["driver_cpu_seconds"] = round(driver_cpu, 2)
        line["actor_process_cpu_seconds"] = [round(c, 2) for c in actor_cpu]
        line["ray_cpu_seconds"] = round(driver_cpu + sum(actor_cpu), 2)
        line["load_average_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]
        line["included"] = len(res["outcome"].included)
        agreements, keystream = round_floor(res["graph"], range(1, n + 1), [i + 1 for i in dropped_rows],
                                            res["outcome"].included, d)
        floor_cpu = agreements * per_agreement_cpu + keystream / rate_cpu
        line["floor"] = {"agreements": agreements, "mask_keystream_bytes": keystream,
                         "cpu_s": round(floor_cpu, 2), "wall_s_on_2_free_cores": round(floor_cpu / 2, 2)}
        line["ray_cpu_over_floor"] = round(line["ray_cpu_seconds"] / floor_cpu, 2)
        line["server_timings"] = {k: round(v, 3) for k, v in res["server_timings"].items()}
        rounds.append(line)
    actor_peaks = ray.get([p.peak_rss_kib.remote() for p, _ in pools])
    report = {
        "benchmark": "ray-sparse-secagg+",
        "command": f"python benchmarks/bench_ray.py --clients {n} --dim {d} --rounds {args.rounds} "
                   f"--num-cpus {args.num_cpus} --dropout {args.dropout}"
                   + (" --compare-in-process" if args.compare_in_process else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                    "platform": platform.platform()},
        "clients": n, "dim": d, "actors": len(pools), "dropped_before_upload": len(dropped_rows),
        "ray_start_seconds": round(ray_start_s, 2), "actor_start_seconds": round(actors_s, 2),
        "agreement_cpu_s (X25519 + HKDF, warm median)": per_agreement_cpu,
        "aes256_ctr_bytes_per_cpu_s": rate_cpu,
        "rounds": rounds,
        "max_abs_error_vs_float_sum": float(np.max(np.abs(total - plain.astype(np.float64)))),
        "baseline_plain_float32_sum_seconds": round(plain_s, 5),
        "driver_peak_rss_mib": round(_peak_rss_kib() / 1024, 1),
        "actor_peak_rss_mib": [round(k / 1024, 1) for k in actor_peaks],
    }
    ray.shutdown()
    if args.compare_in_process:
        load = os.getloadavg()[0]
        t, cpu = time.perf_counter(), time.process_time()
        ref = secagg.aggregate(updates, protection="masking", graph="sparse", clip=100.0, seed=args.seed,
                               dropouts={"masked_input": dropped_rows})
        report["in_process_round_seconds"] = round(time.perf_counter() - t, 2)
        report["in_process_cpu_seconds"] = round(time.process_time() - cpu, 2)
        report["in_process_load_average_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]
        report["identical_to_in_process"] = bool(np.array_equal(ref.total, total))
        last = rounds[-1]
        report["in_process_cpu_over_floor"] = round(report["in_process_cpu_seconds"] / last["floor"]["cpu_s"], 2)
        report["ray_over_in_process"] = {
            "wall": round(last["round_seconds"] / report["in_process_round_seconds"], 3),
            "cpu": round(last["ray_cpu_seconds"] / report["in_process_cpu_seconds"], 3),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
