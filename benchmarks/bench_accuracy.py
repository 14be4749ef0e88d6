"""Accuracy of every demo scenario: no protection, secure aggregation, and secure aggregation + DP.

    nice -n 19 .venv/bin/python benchmarks/bench_accuracy.py --scenarios hospitals,iot,finance,mnist

For each scenario (``federation.scenarios``) three variants run on the same seed, data split and
hyper-parameters:

- ``plain``: protection none, no DP -- the baseline (plain float FedAvg, the server sees every update;
  the scenario's ``without_dp`` settings, e.g. MNIST's non-DP learning rate);
- ``secure``: the scenario's protection (masking, SecAgg+ or CKKS), no DP;
- ``secure+dp``: the scenario's protection and its DP mode at the stated epsilon (record-level DP-SGD,
  or user-level DP-FedAvg for the IoT scenario, which trains without DP in the demo).

Each finished variant is written to ``--out`` (JSON) at once, so an interrupted run keeps what it
measured; ``--markdown`` prints the table for docs/accuracy.md. One torch thread, to share the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from federation.aggregators import protocol_available
from federation.config import ExperimentConfig
from federation.data import default_data_dir
from federation.engine import Federation
from federation.scenarios import scenario_config

# DP for scenarios whose demo trains without it: user-level DP-FedAvg, noise on the secure sum.
EXTRA_DP = {
    "iot": dict(dp="user", sampling="poisson", sampling_rate=0.3, noise_multiplier=1.0, update_clip=1.0,
                delta=1e-3, budget_epsilon=50.0),
    "femnist": dict(dp="user", sampling="poisson", sampling_rate=0.2, noise_multiplier=1.0, update_clip=1.0,
                    delta=1e-3, budget_epsilon=50.0),
}


def variant_config(scenario: str, variant: str, *, rounds: int | None, data_dir: str | None,
                   out: Path, seed: int) -> ExperimentConfig:
    cfg = scenario_config(scenario, dp=variant == "secure+dp")
    cfg.data_dir = data_dir
    cfg.seed = seed
    cfg.out_dir = str(out / f"{scenario}-{variant}")
    if rounds is not None:
        cfg.rounds = rounds
    if variant == "plain":
        cfg.protection, cfg.threshold = "none", None
    if variant == "secure+dp" and cfg.dp == "none":
        for key, value in EXTRA_DP[scenario].items():
            cfg.set(key, value)
    return cfg


def run_variant(cfg: ExperimentConfig) -> dict:
    start = time.perf_counter()
    fed = Federation(cfg)
    summary = fed.run()
    rounds = summary.rounds
    return {
        "protection": cfg.protection, "dp": cfg.dp, "rounds": len(rounds),
        "final_accuracy": summary.final_accuracy,
        "best_accuracy": max(r.accuracy for r in rounds if r.accuracy is not None),
        "accuracy_per_round": [r.accuracy for r in rounds],
        "epsilon": rounds[-1].epsilon if fed.accountant.is_private else None,
        "delta": cfg.delta if fed.accountant.is_private else None,
        "noise_multiplier": cfg.noise_multiplier if fed.accountant.is_private else None,
        "accountant": cfg.accountant if fed.accountant.is_private else None,
        "bytes_up_per_param": sum(r.bytes_up_per_param for r in rounds) / len(rounds),
        "dropped_clients": sum(len(c) for r in rounds for c in r.dropped.values()),
        "max_quantization_error": max(r.max_quantization_error for r in rounds),
        "seconds": time.perf_counter() - start,
        "num_params": summary.num_params,
    }


def markdown(results: dict) -> str:
    lines = ["| scenario | data / clients | plain FedAvg (baseline) | secure aggregation | secure aggregation + DP | epsilon (delta, DP mode, noise) | upload, bytes/param (plain = 4) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["scenarios"].items():
        v = entry["variants"]

        def acc(key, v=v):
            r = v.get(key)
            return "not run" if r is None else f"{r['final_accuracy']:.4f}"

        dp = v.get("secure+dp")
        eps = "" if dp is None else f"{dp['epsilon']:.2f} ({dp['delta']:g}, {dp['dp']}, sigma {dp['noise_multiplier']:g})"
        sec = v.get("secure")
        sec_name = "" if sec is None else f" ({sec['protection']})"
        up = "" if sec is None else f"{sec['bytes_up_per_param']:.1f}"
        lines.append(f"| {name} | {entry['dataset']} / {entry['num_clients']} | {acc('plain')} | "
                     f"{acc('secure')}{sec_name} | {acc('secure+dp')} | {eps} | {up} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="hospitals,iot,finance,mnist")
    parser.add_argument("--variants", default="plain,secure,secure+dp")
    parser.add_argument("--rounds", type=int, default=None, help="override every scenario's rounds")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"benchmark": "accuracy", "scenarios": {}}
    if args.markdown:
        print(markdown(results))
        return 0
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or (str(default_data_dir()) if default_data_dir() else None)
    results.update({"python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": args.threads, "machine": platform.machine()})
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios.split(","):
            for variant in args.variants.split(","):
                cfg = variant_config(scenario, variant, rounds=args.rounds, data_dir=data_dir,
                                     out=Path(tmp), seed=args.seed)
                missing = protocol_available(cfg.protection)
                if missing:
                    print(f"skip {scenario}/{variant}: {missing}", flush=True)
                    continue
                row = run_variant(cfg)
                entry = results["scenarios"].setdefault(scenario, {"variants": {}})
                entry.update({"dataset": cfg.dataset, "num_clients": cfg.num_clients, "model": cfg.model,
                              "clients_per_round": cfg.clients_per_round, "seed": args.seed})
                entry["variants"][variant] = row
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2))
                eps = "" if row["epsilon"] is None else f"  eps {row['epsilon']:.2f}"
                print(f"{scenario:10s} {variant:10s} acc {row['final_accuracy']:.4f}{eps}  "
                      f"{row['seconds']:.0f}s", flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
