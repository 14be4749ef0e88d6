"""Scaling plot: masking round time against N (complete and SecAgg+ graphs) and against d.

Every point is one real in-process round (``secagg.bench.masking.run_masking_bench``: real
keys, signatures, Shamir shares and masks; 10 % of the clients never deliver their masked
vector), beside the AES-256-CTR keystream limit measured in the same run, so each time also
reads as a multiple of the least time the keystream alone needs. Writes
``benchmarks/results/scaling.json`` and ``docs/scaling.png`` (shown in docs/benchmarks.md).

    python benchmarks/bench_scaling.py                 # the grid below, a few minutes on 2 cores
    python benchmarks/bench_scaling.py --workers 2     # masks expanded on two threads per party

The machine's load average is recorded with every point: absolute times on a shared machine
are upper bounds; the ratios to the keystream limit, measured in the same run, are the figures
to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from secagg.bench.masking import run_masking_bench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "scaling.png"

N_SWEEP = (25, 50, 100, 200)  # at d = N_SWEEP_DIM, both graphs (the planner keeps N < 100 complete)
N_SWEEP_DIM = 10_000
D_SWEEP = (10_000, 100_000, 1_000_000)  # at N = D_SWEEP_CLIENTS, complete graph
D_SWEEP_CLIENTS = 20

KEPT = ("clients", "dim", "graph", "degree", "threshold", "workers", "simulation_wall_s", "server_unmask_s",
        "server_total_s", "client_mask_s", "client_total_s", "aes256_ctr_bytes_per_s",
        "server_unmask_keystream_limit_s", "server_unmask_over_keystream_limit", "client_mask_keystream_limit_s",
        "client_mask_over_keystream_limit", "agreement_s", "server_unmask_floor_s", "client_mask_floor_s", "max_abs_error", "quantization_error_bound", "load_avg_1min")


def run(workers: int) -> list[dict]:
    points = [(n, N_SWEEP_DIM, g) for g in ("complete", "sparse") for n in N_SWEEP]
    points += [(D_SWEEP_CLIENTS, d, "complete") for d in D_SWEEP]
    rows = []
    for clients, dim, graph in points:
        row = run_masking_bench(clients=clients, dim=dim, dropout=0.1, graph=graph, workers=workers)
        row = {k: row[k] for k in KEPT}
        row["requested_graph"] = graph
        rows.append(row)
        print(f"N={clients:4d} d={dim:8d} {graph:8s} (k={row['degree']}) round {row['simulation_wall_s']:7.2f} s, "
              f"server unmask {row['server_unmask_s']:.3f} s = {row['server_unmask_over_keystream_limit']:.1f}x "
              f"limit, client mask {row['client_mask_s']:.4f} s = {row['client_mask_over_keystream_limit']:.1f}x "
              f"limit, load {row['load_avg_1min']:.1f}", flush=True)
    return rows


def plot(rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4.2))
    for graph, marker in (("complete", "o"), ("sparse", "s")):
        sweep = [r for r in rows if r["requested_graph"] == graph and r["dim"] == N_SWEEP_DIM and r["clients"] in N_SWEEP]
        ns = [r["clients"] for r in sweep]
        left.plot(ns, [r["simulation_wall_s"] for r in sweep], marker=marker, label=f"whole round, {graph}")
        middle.plot(ns, [r["server_unmask_s"] for r in sweep], marker=marker, label=f"server unmask, {graph}")
        middle.plot(ns, [r["server_unmask_keystream_limit_s"] for r in sweep], marker=marker, linestyle=":",
                    label=f"its keystream limit, {graph}")
    left.set(xscale="log", yscale="log", xlabel="clients N", ylabel="seconds",
             title=f"In-process round (all clients + server), d={N_SWEEP_DIM:.0e}")
    middle.set(xscale="log", yscale="log", xlabel="clients N", ylabel="seconds",
               title=f"Server unmasking vs keystream limit, d={N_SWEEP_DIM:.0e}")
    for ax in (left, middle):
        ax.set_xticks(N_SWEEP, [str(n) for n in N_SWEEP], minor=False)
        ax.set_xticks([], minor=True)
    sweep = [r for r in rows if r["clients"] == D_SWEEP_CLIENTS and r["dim"] in D_SWEEP]
    ds = [r["dim"] for r in sweep]
    for key, label, style in (("server_unmask_s", "server unmask", "-"),
                              ("server_unmask_keystream_limit_s", "server keystream limit", ":"),
                              ("client_mask_s", "client mask (mean)", "-"),
                              ("client_mask_keystream_limit_s", "client keystream limit", ":")):
        right.plot(ds, [r[key] for r in sweep], marker="o", linestyle=style, label=label)
    right.set(xscale="log", yscale="log", xlabel="parameters d", ylabel="seconds",
              title=f"Time vs d, N={D_SWEEP_CLIENTS}, complete")
    for ax in (left, middle, right):
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    loads = [r["load_avg_1min"] for r in rows]
    fig.suptitle(f"secagg masking, 10 % dropping; {meta['cpu_count']} cores, load average "
                 f"{min(loads):.1f}-{max(loads):.1f}; AES-256-CTR {meta['keystream_gb_per_s']:.2f}-"
                 f"{meta['keystream_gb_per_s_max']:.2f} GB/s (same run); workers={meta['workers']}; {meta['when']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="mask-expansion threads per party (default 1)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.workers)
    meta = {
        "machine": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "workers": args.workers,
        "keystream_gb_per_s": min(r["aes256_ctr_bytes_per_s"] for r in rows) / 1e9,
        "keystream_gb_per_s_max": max(r["aes256_ctr_bytes_per_s"] for r in rows) / 1e9,
        "wall_s": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, meta)
    print(f"wrote {RESULTS / 'scaling.json'} and {FIGURE} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
