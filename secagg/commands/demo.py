"""``secagg demo``: end-to-end scenarios with sensible defaults (``make demo`` runs hospitals)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
    from federation.scenarios import SCENARIOS, scenario_config
    from secagg.commands.run import apply_overrides, execute

    scenario = SCENARIOS[args.scenario]
    dp_off = args.opt_dp == "none" or any(o.replace(" ", "") == "dp=none" for o in args.set_options)
    config = scenario_config(args.scenario, dp=not dp_off)
    if args.opt_out_dir is None:
        # each demo run gets its own folder, so `make demo` can be run again (`--out` to choose);
        # --resume continues the latest one
        base = Path(config.out_dir)
        if args.resume:
            runs = sorted(p.parent for p in base.glob("*/checkpoint.json"))
            if not runs:
                from secagg.errors import ConfigError

                raise ConfigError(f"no {args.scenario} demo run to resume under {base}/; pass --out DIR")
            config.out_dir = str(runs[-1])
        else:
            config.out_dir = str(base / time.strftime("%Y%m%d-%H%M%S"))
    if args.scenario == "shops" and args.opt_data_dir is not None:
        config.dataset = "movielens"  # --data-dir names the user's MovieLens files for this scenario
    apply_overrides(config, args)
    if not config.protection.startswith("masking") and "threshold" not in " ".join(args.set_options):
        config.threshold = None  # the scenario's masking threshold means nothing for other protections
    if not args.json:
        print(f"secagg demo: {scenario.title}")
        if config.dataset == "shops":
            print("  Data: synthetic shops (generated, seeded; see docs/recommendation.md), not real customers.")
        print(f"  {scenario.story}")
        print(f"  protection={config.protection}  dp={config.dp}  rounds={config.rounds}  "
              f"output={config.out_dir}")
        print()
    return execute(config, args, noun=scenario.client_noun)
