"""CKKS / BFV aggregation benchmark: `python benchmarks/bench_ckks.py --clients 10 --dim 1e5 --json`.

A thin script over ``secagg.bench.ckks`` (the same code as `secagg bench ckks`). Every run
prints a plain float32 sum of the same updates measured in the same process, and the
ratios to it. ``--out`` writes the JSON, e.g. to benchmarks/results/ckks_n10_d1e5.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from secagg.bench.ckks import add_ckks_arguments, run_ckks_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ckks_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--repeat", type=int, default=1, help="run this many rounds; report each")
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("json", "out", "repeat")}
    runs = [run_ckks_bench(**options) for _ in range(args.repeat)]
    result = runs[0] if len(runs) == 1 else {"runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for run in runs:
            for key, value in run.items():
                print(f"{key:<28} {value:.6g}" if isinstance(value, float) else f"{key:<28} {value}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
