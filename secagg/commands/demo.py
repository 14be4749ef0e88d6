"""``secagg demo``: end-to-end scenarios with sensible defaults (``make demo`` runs hospitals)."""

from __future__ import annotations

import argparse

SCENARIO_NAMES = ("hospitals", "finance", "iot", "mnist", "femnist", "shops")


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Run a demo federation. hospitals (default): 10 hospitals on the breast cancer "
                    "data, DP-SGD clients, masked secure aggregation, one hospital dropping mid-round. "
                    "finance: banks with CKKS. iot: 100 devices, sparse SecAgg+, 16-bit updates. "
                    "mnist / femnist: image data from --data-dir. shops: 8 shops train a recommender "
                    "(synthetic purchases; MovieLens ratings.csv / u.data with --data-dir), item "
                    "embeddings masked, customer embeddings stay in each shop. See docs/demos.md.",
    )
    parser.add_argument("--scenario", choices=SCENARIO_NAMES, default="hospitals", help="which demo to run")
    from secagg.commands.run import add_common_options

    add_common_options(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from federation.launch import run_demo
    from secagg.commands.run import run_options

    return run_demo(args.scenario, **run_options(args))
