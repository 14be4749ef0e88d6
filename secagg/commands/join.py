"""`secagg join`: take part in aggregation rounds as a client over gRPC with mutual TLS."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys

if importlib.util.find_spec("grpc") is None:  # the CLI lists the command as unavailable, naming the extra
    raise ImportError(f"`secagg {__name__.rsplit('.', 1)[-1]}` needs grpcio: pip install 'secagg[grpc]'")


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Connect to a `secagg serve` server with this client's certificate and protocol "
            "identity, contribute one update per round (from [client.input]) and receive the "
            "released aggregate. Prints one JSON line per round."
        ),
    )
    parser.add_argument("--server", default=None, help="HOST:PORT of the server (overrides [client] server)")
    parser.add_argument("--config", required=True, help="client TOML file (see examples/client.toml)")
    parser.add_argument("--server-name", default=None, help="TLS name to expect in the server certificate")
    parser.add_argument("--out", default=None, help="directory to save each released aggregate as round-<r>.npy")
    parser.add_argument(
        "--app", default=None, metavar="MODULE:FUNCTION",
        help="train on this site's own private data: FUNCTION() in MODULE returns an (x, y) pair of arrays "
             "(needs [client.training] in the config; the model and options come from its experiment)",
    )
    parser.add_argument(
        "--retry", type=float, default=0.0,
        help="keep reconnecting for this many seconds while the server is unreachable or restarts (default 0)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.set_defaults(func=_join)


def _join(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import asyncio
    import time
    from pathlib import Path

    import numpy as np

    from federation.transport.certs import Credentials
    from federation.transport.config import input_source, load_client_config
    from federation.transport.grpc_client import run_client

    cfg = load_client_config(args.config)
    if args.server:
        cfg.settings.server = args.server
    if args.server_name:
        cfg.settings.server_name = args.server_name
    creds = Credentials.load(cfg.credentials)
    peer = creds.check_binding()
    if args.app and cfg.training is None:
        from secagg.errors import ConfigError

        raise ConfigError(f"--app trains a model, but {args.config} has no [client.training] table naming the "
                          "experiment TOML the server trains")
    source = input_source(cfg.input, cfg.base, peer.client_id) if cfg.training is None else None
    trainer = None
    if cfg.training is not None:
        from federation.config import ExperimentConfig
        from federation.transport.training import MODES, TrainingClient

        experiment = ExperimentConfig.from_toml(cfg.training["experiment"])
        private = {}
        if args.app:
            from federation.custom import site_data

            private = dict(zip(("x", "y"), site_data(args.app)))
        trainer = TrainingClient(experiment, int(cfg.training.get("index", peer.client_id - 1)), **private)
        # take part only in the protection the experiment names (never a weaker one)
        if experiment.protection in MODES:
            cfg.settings.modes = (MODES[experiment.protection][0],)
    out = Path(args.out) if args.out else None

    def on_round_end(r: int, total) -> None:
        line = {"round": r, "client": peer.client_id, "ok": total is not None}
        if total is not None:
            line["norm"] = float(np.linalg.norm(total))
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                np.save(out / f"round-{r}.npy", total, allow_pickle=False)
        print(json.dumps(line), flush=True)

    async def session() -> int:
        # Reconnect while the server is unreachable, restarting or shutting down, for up to
        # --retry seconds after the last progress; stop when it says there are no more rounds.
        deadline = time.monotonic() + args.retry
        while True:
            report = await run_client(
                cfg.settings, creds, source, on_round_end=on_round_end,
                update_from_broadcast=None if trainer is None else trainer.update,
            )
            for r, reason in sorted(report.dropped.items()):
                print(json.dumps({"round": r, "client": peer.client_id, "dropped": reason}), flush=True)
            if report.finished:
                return 0
            why = report.lost or report.bye or "the stream ended without a goodbye"
            if time.monotonic() >= deadline:
                print(f"secagg join: connection ended before the last round: {why}", file=sys.stderr)
                return 1
            await asyncio.sleep(1.0)
            if report.rounds:  # made progress: the retry window starts again
                deadline = time.monotonic() + args.retry

    return asyncio.run(session())
