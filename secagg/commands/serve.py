"""`secagg serve`: run an aggregation server over gRPC with mutual TLS (or simulate clients on Ray)."""

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
            "Run secure aggregation rounds. With --backend grpc (default) the server listens with "
            "mutual TLS and waits for `secagg join` clients; only clients holding a certificate "
            "from the deployment CA are accepted. With --backend ray the clients are simulated "
            "as Ray actors on a new local Ray or on an existing cluster (--ray-address). Each completed round prints one "
            "JSON line; with `state_dir` set, a restarted server resumes after the last completed round."
        ),
    )
    parser.add_argument("--config", required=True, help="server TOML file (see examples/server.toml)")
    parser.add_argument("--host", default=None, help="override [server] host")
    parser.add_argument("--port", type=int, default=None, help="override [server] port")
    parser.add_argument("--rounds", type=int, default=None, help="override [server] rounds")
    parser.add_argument("--backend", choices=("grpc", "ray"), default="grpc",
                        help="grpc: real clients over mutual TLS (default); ray: simulated clients")
    parser.add_argument("--clients", type=int, default=None, help="ray backend: number of simulated clients")
    parser.add_argument(
        "--ray-address", default=None,
        help="ray backend: join the cluster at HOST:PORT (its GCS address) or 'auto'; token auth is used when "
             "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token holds a token. Default: start a new "
             "local Ray for this run (never joins a running one). ray:// addresses are refused.")
    parser.add_argument("--num-cpus", type=int, default=None, help="ray backend: CPUs for the new local Ray")
    parser.add_argument("--seed", type=int, default=None, help="ray backend: fix client inputs (tests/benchmarks)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    log_to_stderr(args.log_level)
    from federation.transport.serve import serve

    return serve(args.config, backend=args.backend, host=args.host, port=args.port, rounds=args.rounds,
                 clients=args.clients, ray_address=args.ray_address, num_cpus=args.num_cpus, seed=args.seed,
                 on_line=lambda line: print(json.dumps(line), flush=True))
