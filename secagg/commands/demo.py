"""``secagg demo``: end-to-end scenarios with sensible defaults (``make demo`` runs hospitals)."""

from __future__ import annotations

import argparse

SCENARIO_NAMES = ("hospitals", "finance", "iot", "mnist", "femnist", "shops")
SHOPS_PRESETS = ("default", "many-customers", "small-shops")  # federation.scenarios.SHOPS_PRESET_OPTIONS


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
    parser.add_argument(
        "--preset", choices=SHOPS_PRESETS, default="default",
        help="shops only: which synthetic shops to generate (all three are synthetic data, not real "
             "customers). default: 8 shops of about 430 customers, 1,000 items (fast). many-customers: "
             "16 shops, 22,124 customers, 300 items -- enough customers that customer-level DP noise on "
             "the item table is small against the signal. small-shops: 50 shops of 200 customers, 300 "
             "items -- each shop alone is short of purchases, the case federating is for (federated + "
             "masking + customer-level DP beats most shops alone). Use the same --preset with --resume.")
    from secagg.commands.run import add_common_options

    add_common_options(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from federation.launch import run_demo
    from secagg.commands.run import run_options

    return run_demo(args.scenario, preset=args.preset, **run_options(args))
