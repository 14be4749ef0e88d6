"""Masking benchmark grid: writes benchmarks/results/masking.json and masking.png.

Each configuration runs one real round (``secagg bench masking`` does one) beside a plain
float32 sum of the same updates, measured in the same run. Peer figures (Flower 1.42 on a
2-core machine of the same kind, from the project's peer measurements) are printed beside
ours for the same configuration; they are reference numbers, not re-measured here.

    python benchmarks/bench_masking.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from secagg.bench.masking import run_masking_bench

RESULTS = Path(__file__).parent / "results"

# Flower 1.42 SecAgg/SecAgg+, 10% dropout, measured on a 2-core machine: (client mask s, server unmask s, B/param)
FLOWER = {
    (50, 100_000, "complete"): (0.35, 13.3, 8.4),
    (100, 100_000, "complete"): (1.33, 98.0, 8.7),
    (100, 1_000_000, "complete"): (1.60, 98.0, 8.1),
    (100, 1_000_000, "sparse"): (0.13, 5.5, 8.0),
}

GRID = [
    (50, 100_000, "complete"),
    (100, 100_000, "complete"),
    (100, 1_000_000, "complete"),
    (100, 1_000_000, "sparse"),
    (200, 100_000, "complete"),
    (200, 100_000, "sparse"),
    (500, 10_000, "sparse"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the N=100, d=1e6 configurations")
    args = parser.parse_args()
    grid = [g for g in GRID if g[:2] == (100, 1_000_000)] if args.quick else GRID
    rows = []
    for clients, dim, graph in grid:
        row = run_masking_bench(clients=clients, dim=dim, dropout=0.1, graph=graph)
        peer = FLOWER.get((clients, dim, graph))
        if peer:
            row["flower_client_mask_s"], row["flower_server_unmask_s"], row["flower_bytes_up_per_param"] = peer
        rows.append(row)
        print(f"N={clients:4d} d={dim:8d} {graph:8s} server_unmask={row['server_unmask_s']:.3f}s "
              f"client_mask={row['client_mask_s']:.3f}s plain_sum={row['plain_sum_s']:.4f}s "
              f"B/param={row['bytes_up_per_param']:.3f} err={row['max_abs_error']:.2e}"
              + (f"  | Flower: unmask {peer[1]}s, mask {peer[0]}s, {peer[2]} B/param" if peer else ""))
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / "masking.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    compared = [r for r in rows if "flower_server_unmask_s" in r]
    if not compared:
        return
    labels = [f"N={r['clients']}\nd={r['dim']:.0e}\n{r['graph']}" for r in compared]
    x = range(len(compared))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [r["flower_server_unmask_s"] for r in compared], 0.4, label="Flower 1.42 (reference)")
    ax.bar([i + 0.2 for i in x], [r["server_unmask_s"] for r in compared], 0.4, label="secagg (this run)")
    ax.set_yscale("log")
    ax.set_ylabel("server unmask time, s (log)")
    ax.set_xticks(list(x), labels)
    ax.set_title("Server unmasking, 10% of clients drop before sending their masked vector")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "masking.png", dpi=120)


if __name__ == "__main__":
    main()
