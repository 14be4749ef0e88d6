"""`secagg join`: take part in aggregation rounds as a client over gRPC with mutual TLS."""

from __future__ import annotations

import argparse
import importlib.util
import json

from secagg.cli import log_to_stderr

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
    log_to_stderr(args.log_level)
    from federation.transport.join import join

    return join(args.config, server=args.server, server_name=args.server_name, app=args.app, retry=args.retry,
                out=args.out, on_line=lambda line: print(json.dumps(line), flush=True))
