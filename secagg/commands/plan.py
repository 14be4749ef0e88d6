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
import math
from typing import Any

from secagg.errors import ConfigError

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


def _resolve(args: argparse.Namespace) -> tuple[float, int]:
    if args.sample_rate is not None:
        if args.batch_size is not None:
            raise ConfigError("give --sample-rate or --batch-size with --dataset-size, not both")
        q = args.sample_rate
    elif args.batch_size is not None and args.dataset_size is not None:
        if args.batch_size <= 0 or args.dataset_size <= 0:
            raise ConfigError("--batch-size and --dataset-size must be positive")
        q = args.batch_size / args.dataset_size
    else:
        raise ConfigError(
            "missing sampling rate: give --sample-rate Q, or --batch-size B --dataset-size N"
        )
    if args.steps is not None and args.epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None:
        if not (args.epochs > 0) or not (0 < q <= 1):
            raise ConfigError("--epochs must be > 0 and the sampling rate in (0, 1]")
        steps = int(math.ceil(args.epochs / q))
    else:
        raise ConfigError("missing length: give --steps N or --epochs E")
    return q, steps


def run(args: argparse.Namespace) -> int:
    import privacy

    q, steps = _resolve(args)
    names = list(_ACCOUNTANTS) if args.accountant == "all" else [args.accountant]
    out: dict[str, Any] = {"sample_rate": q, "steps": steps, "delta": args.delta,
                           "dataset_size": args.dataset_size}
    if args.noise_multiplier is not None:
        out["noise_multiplier"] = args.noise_multiplier
        out["epsilon"] = {
            n: privacy.epsilon(noise_multiplier=args.noise_multiplier, sample_rate=q, steps=steps,
                               delta=args.delta, accountant=n, dataset_size=args.dataset_size)
            for n in names
        }
    else:
        out["target_epsilon"] = args.target_epsilon
        out["noise_multiplier"] = {
            n: privacy.noise_multiplier(target_epsilon=args.target_epsilon, delta=args.delta,
                                        sample_rate=q, steps=steps, accountant=n,
                                        dataset_size=args.dataset_size)
            for n in names
        }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"sampling rate q = {q:.6g}, steps = {steps}, delta = {args.delta:g}")
    if args.noise_multiplier is not None:
        for n, eps in out["epsilon"].items():
            print(f"  epsilon ({n}) = {eps:.4f}   for noise multiplier {args.noise_multiplier:g}")
    else:
        for n, s in out["noise_multiplier"].items():
            print(f"  noise multiplier ({n}) = {s:.4f}   for epsilon <= {args.target_epsilon:g}")
    return 0
