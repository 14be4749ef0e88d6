"""``secagg plan``: epsilon for a given noise, or the noise for a target epsilon.

Examples::

    secagg plan --noise-multiplier 1.12 --sample-rate 0.004267 --steps 14062 --delta 1e-5
    secagg plan --target-epsilon 3 --batch-size 256 --dataset-size 60000 --epochs 60 --delta 1e-5
    secagg plan --target-epsilon 8 --sample-rate 0.01 --steps 500 --delta 1e-6 --accountant all --json

Privacy code (numpy, dp-accounting, opacus) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_ACCOUNTANTS = ("prv", "pld", "rdp")


def register(subparsers: Any, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description=(
            "Plan a differential-privacy budget for Poisson-sampled Gaussian releases "
            "(DP-SGD steps, record level; or DP-FedAvg rounds, user level). Give "
            "--noise-multiplier to get epsilon, or --target-epsilon to get the smallest noise "
            "multiplier that meets it. The sampling rate is --sample-rate, or "
            "--batch-size / --dataset-size; the number of steps is --steps, or --epochs / "
            "sampling rate."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--noise-multiplier", "--sigma", type=float, help="noise std / clipping norm")
    goal.add_argument("--target-epsilon", type=float, help="epsilon to reach (plans the noise)")
    p.add_argument("--sample-rate", "-q", type=float, help="probability a record/client takes part in a step")
    p.add_argument("--batch-size", type=int, help="expected batch size (with --dataset-size)")
    p.add_argument("--dataset-size", "-n", type=int,
                   help="records (or users); also checks delta < 1/n")
    p.add_argument("--steps", type=int, help="number of steps (or rounds)")
    p.add_argument("--epochs", type=float, help="epochs; steps = epochs / sample rate")
    p.add_argument("--delta", type=float, required=True, help="target delta, e.g. 1e-5")
    p.add_argument("--accountant", choices=_ACCOUNTANTS + ("all",), default="prv",
                   help="accountant (default prv; 'all' compares them)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from privacy.planner import plan_budget

    out = plan_budget(
        delta=args.delta, noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
        sample_rate=args.sample_rate, batch_size=args.batch_size, dataset_size=args.dataset_size,
        steps=args.steps, epochs=args.epochs,
        accountants=_ACCOUNTANTS if args.accountant == "all" else (args.accountant,),
    )
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"sampling rate q = {out['sample_rate']:.6g}, steps = {out['steps']}, delta = {args.delta:g}")
    if args.noise_multiplier is not None:
        for n, eps in out["epsilon"].items():
            print(f"  epsilon ({n}) = {eps:.4f}   for noise multiplier {args.noise_multiplier:g}")
    else:
        for n, s in out["noise_multiplier"].items():
            print(f"  noise multiplier ({n}) = {s:.4f}   for epsilon <= {args.target_epsilon:g}")
    return 0
