"""``secagg run CONFIG.toml``: a federated experiment from a TOML file; flags override it."""

from __future__ import annotations

import argparse

# Flags that override one config option each: (flag, option, type, help).
OVERRIDES: list[tuple[str, str, type, str]] = [
    ("--rounds", "rounds", int, "number of rounds"),
    ("--clients", "num_clients", int, "number of clients"),
    ("--clients-per-round", "clients_per_round", int, "clients sampled per round"),
    ("--protection", "protection", str, "none | masking | masking-sparse | ckks"),
    ("--strategy", "strategy", str, "fedavg | fedprox | fedadam | fedyogi"),
    ("--dp", "dp", str, "none | dpsgd | user | user-distributed"),
    ("--noise-multiplier", "noise_multiplier", float, "DP noise multiplier"),
    ("--budget-epsilon", "budget_epsilon", float, "privacy budget (epsilon) the ledger enforces"),
    ("--threshold", "threshold", int, "masking threshold t (clients needed to unmask; a floor, raised to the secure minimum)"),
    ("--dropout-rate", "dropout_rate", float, "probability a sampled client drops mid-protocol"),
    ("--data-dir", "data_dir", str, "folder holding the datasets (default: ../shared/data if present)"),
    ("--out", "out_dir", str, "output folder (metrics, checkpoint, ledger, report)"),
    ("--seed", "seed", int, "public seed: partition, sampling, initialisation, batch order"),
]


def add_common_options(parser: argparse.ArgumentParser) -> None:
    for flag, option, kind, text in OVERRIDES:
        metavar = {int: "N", float: "X"}.get(kind, {"out_dir": "DIR", "data_dir": "DIR"}.get(option, "NAME"))
        parser.add_argument(flag, dest=f"opt_{option}", type=kind, default=None, metavar=metavar, help=text)
    parser.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config option, e.g. --set lr=0.05 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per round, then a summary")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the output folder after a crash (no budget is re-spent)")
    parser.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess",
                        help="where clients train and run the protection protocol (masking or ckks): this "
                             "process (default) or Ray workers (needs the ray extra)")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="with --backend ray: join this Ray cluster (GCS address or 'auto') instead of "
                             "starting a new local Ray; see docs/deployment.md for token authentication")
    parser.add_argument("--num-cpus", type=int, default=None, metavar="N",
                        help="with --backend ray and no --ray-address: CPUs of the new local Ray")


def run_options(args: argparse.Namespace) -> dict:
    """What every run command hands federation.launch: the overrides and the backend flags."""
    return {
        "options": {option: getattr(args, f"opt_{option}") for _, option, _, _ in OVERRIDES},
        "sets": args.set_options, "backend": args.backend, "ray_address": args.ray_address,
        "num_cpus": args.num_cpus, "resume": args.resume, "as_json": args.json,
    }


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Run a federated experiment described by a TOML file (see examples/*.toml). "
                    "Flags and --set override the file; results go to the output folder.",
    )
    parser.add_argument("config", help="experiment TOML file")
    add_common_options(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from federation.launch import run_experiment

    return run_experiment(args.config, **run_options(args))
