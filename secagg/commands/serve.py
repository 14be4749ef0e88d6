"""`secagg serve`: run an aggregation server over gRPC with mutual TLS (or simulate clients on Ray)."""

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
    parser.add_argument("--backend", choices=("grpc", "ray"), default="grpc")
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


def _train(cfg, creds) -> int:
    """[server] training = "experiment.toml": train a model; resumes from its checkpoint and ledger."""
    from federation.config import ExperimentConfig
    from federation.transport.training import GrpcFederation

    config = ExperimentConfig.from_toml(cfg.training)
    fed = GrpcFederation(config, cfg.settings, creds)
    try:
        summary = fed.run(resume=True, on_round=lambda r: print(json.dumps(r.to_json()), flush=True))
    finally:
        fed.close()
    return 0 if summary.rounds and all(r.aborted is None for r in summary.rounds) else 1


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from federation.transport.config import load_server_config

    cfg = load_server_config(args.config)
    s = cfg.settings
    if args.host is not None:
        s.host = args.host
    if args.port is not None:
        s.port = args.port
    if args.rounds is not None:
        s.rounds = args.rounds
    if args.backend == "ray" and cfg.training is not None:
        return _train_on_ray(cfg, args)
    if args.backend == "ray":
        from federation.transport.ray_backend import run_ray_rounds

        n = args.clients or s.expected_clients
        for report in run_ray_rounds(
            n_clients=n, mode=s.mode, options=s.options, rounds=s.rounds, threshold=s.threshold,
            address=args.ray_address, num_cpus=args.num_cpus, seed=args.seed,
        ):
            print(json.dumps(report), flush=True)
        return 0
    import asyncio

    from federation.transport.certs import Credentials
    from federation.transport.grpc_server import serve_forever_with_state

    creds = Credentials.load(cfg.credentials)
    creds.check_binding()
    if cfg.training is not None:
        return _train(cfg, creds)
    ok = asyncio.run(serve_forever_with_state(s, creds, cfg.state_dir, print_line=lambda d: print(json.dumps(d), flush=True)))
    return 0 if ok else 1


def _train_on_ray(cfg, args) -> int:
    """--backend ray with [server] training: the engine, clients trained and aggregated on Ray."""
    import ray

    from federation.config import ExperimentConfig
    from federation.transport.ray_backend import ray_federation, start_ray

    config = ExperimentConfig.from_toml(cfg.training)
    started = start_ray(args.ray_address, args.num_cpus)
    try:
        summary = ray_federation(config).run(resume=True, on_round=lambda r: print(json.dumps(r.to_json()), flush=True))
    finally:
        if started:
            ray.shutdown()
    return 0 if summary.rounds and all(r.aborted is None for r in summary.rounds) else 1
