"""`secagg serve`: run the rounds a server TOML describes, over gRPC or with clients on Ray.

One function, :func:`serve`, holds the choice `secagg serve` makes: with ``[server] training``
the federation engine trains a model (clients on other hosts over gRPC, or Ray tasks through
:func:`federation.launch.open_federation`, the one place a backend becomes a federation);
without it, rounds aggregate the clients' ``[client.input]`` vectors (gRPC) or synthetic
vectors (Ray simulation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from secagg.errors import ConfigError

BACKENDS = ("grpc", "ray")


def serve(config_path: str | Path, *, backend: str = "grpc", host: str | None = None, port: int | None = None,
          rounds: int | None = None, clients: int | None = None, ray_address: str | None = None,
          num_cpus: int | None = None, seed: int | None = None,
          on_line: Callable[[dict], None] = lambda line: None) -> int:
    """Run the server ``config_path`` describes (``host``, ``port``, ``rounds`` override it) on
    ``backend``; ``on_line`` gets one dict per completed round. Returns 0 when every round
    completed, 1 otherwise. Ray only: ``clients`` simulated clients (default: the expected
    count), on a new local Ray with ``num_cpus`` or the cluster at ``ray_address``; ``seed``
    fixes their inputs (tests and benchmarks)."""
    from federation.transport.config import load_server_config

    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    cfg = load_server_config(config_path)
    s = cfg.settings
    if host is not None:
        s.host = host
    if port is not None:
        s.port = port
    if rounds is not None:
        s.rounds = rounds
    if cfg.training is not None:
        return _train(cfg, backend, ray_address=ray_address, num_cpus=num_cpus, on_line=on_line)
    if backend == "ray":
        from federation.transport.ray_backend import run_ray_rounds

        for report in run_ray_rounds(
            n_clients=clients or s.expected_clients, protection=s.protection, options=s.options, rounds=s.rounds,
            threshold=s.threshold, address=ray_address, num_cpus=num_cpus, seed=seed,
        ):
            on_line(report)
        return 0
    import asyncio

    from federation.transport.certs import Credentials
    from federation.transport.grpc_server import serve_resumable_rounds

    creds = Credentials.load(cfg.credentials)
    creds.check_binding()
    return 0 if asyncio.run(serve_resumable_rounds(s, creds, cfg.state_dir, print_line=on_line)) else 1


def _train(cfg, backend: str, *, ray_address: str | None, num_cpus: int | None,
           on_line: Callable[[dict], None]) -> int:
    """``[server] training = "experiment.toml"``: train a model; resumes from its checkpoint and ledger."""
    from federation.config import ExperimentConfig

    config = ExperimentConfig.from_toml(cfg.training)
    if backend == "ray":
        from federation.launch import open_federation

        with open_federation(config, backend="ray", ray_address=ray_address, num_cpus=num_cpus) as fed:
            summary = fed.run(resume=True, on_round=lambda r: on_line(r.to_json()))
    else:
        from federation.transport.certs import Credentials
        from federation.transport.training import GrpcFederation

        creds = Credentials.load(cfg.credentials)
        creds.check_binding()
        fed = GrpcFederation(config, cfg.settings, creds)
        try:
            summary = fed.run(resume=True, on_round=lambda r: on_line(r.to_json()))
        finally:
            fed.close()
    return 0 if summary.rounds and all(r.aborted is None for r in summary.rounds) else 1
