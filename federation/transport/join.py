"""`secagg join`: one client's session with a `secagg serve` server, and its security policy.

:func:`accepted_protections` is the client's policy: which protection it takes part in. A client that
trains for an experiment accepts only the protection that experiment names (a server cannot
talk it into a weaker one, e.g. ``none`` for a ``masking`` experiment); a client contributing
from ``[client.input]`` accepts what its own ``[client] protections`` lists. :func:`join` runs the
session: it reconnects while the server is unreachable or restarting, and reports each round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from secagg.errors import ConfigError, ConnectionLost

if TYPE_CHECKING:  # the experiment config pulls in torch: a client without training never loads it
    from federation.config import ExperimentConfig
    from federation.transport.config import ClientConfig


def accepted_protections(client: ClientConfig, experiment: ExperimentConfig | None = None) -> tuple[str, ...]:
    """The protections this client takes part in: the one ``experiment`` names when it trains
    for one (never a weaker one), else those of its ``[client] protections``."""
    if experiment is None:
        return tuple(client.settings.protections)
    from federation.aggregators import PROTECTION_MODES

    if experiment.protection not in PROTECTION_MODES:
        raise ConfigError(f"protection {experiment.protection!r} does not run over gRPC; use one of "
                          f"{', '.join(PROTECTION_MODES)}")
    return (PROTECTION_MODES[experiment.protection][0],)


def join(config_path: str | Path, *, server: str | None = None, server_name: str | None = None,
         app: str | None = None, retry: float = 0.0, out: str | Path | None = None,
         on_line: Callable[[dict], None] = lambda line: None) -> int:
    """Take part in rounds as the client ``config_path`` describes until the server says there are
    no more; return 0, or 1 when the connection ended earlier and ``retry`` seconds passed without
    progress. ``on_line`` gets one dict per round (its norm, or why this client was dropped); with
    ``out`` each released aggregate is saved as ``round-<r>.npy``; ``app`` ("MODULE:FUNCTION")
    returns this site's private training records."""
    from federation.transport.certs import Credentials
    from federation.transport.config import input_source, load_client_config
    from federation.transport.grpc_client import run_client

    cfg = load_client_config(config_path)
    if server:
        cfg.settings.server = server
    if server_name:
        cfg.settings.server_name = server_name
    creds = Credentials.load(cfg.credentials)
    peer = creds.check_binding()
    if app and cfg.training is None:
        raise ConfigError(f"--app trains a model, but {config_path} has no [client.training] table naming the "
                          "experiment TOML the server trains")
    source = input_source(cfg.input, cfg.base, peer.client_id) if cfg.training is None else None
    trainer = None
    if cfg.training is not None:
        from federation.config import ExperimentConfig
        from federation.transport.training import TrainingClient

        experiment = ExperimentConfig.from_toml(cfg.training["experiment"])
        private = {}
        if app:
            from federation.custom import site_data

            private = dict(zip(("x", "y"), site_data(app)))
        trainer = TrainingClient(experiment, int(cfg.training.get("index", peer.client_id - 1)), **private)
        cfg.settings.protections = accepted_protections(cfg, experiment)
    folder = Path(out) if out else None

    def on_round_end(r: int, total) -> None:
        line = {"round": r, "client": peer.client_id, "ok": total is not None}
        if total is not None:
            line["norm"] = float(np.linalg.norm(total))
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"round-{r}.npy", total, allow_pickle=False)
        on_line(line)

    async def session() -> int:
        # Reconnect while the server is unreachable, restarting or shutting down, for up to
        # `retry` seconds after the last progress; stop when it says there are no more rounds.
        deadline = time.monotonic() + retry
        while True:
            report = await run_client(
                cfg.settings, creds, source, on_round_end=on_round_end,
                update_from_broadcast=None if trainer is None else trainer.update,
            )
            for r, reason in sorted(report.dropped.items()):
                on_line({"round": r, "client": peer.client_id, "dropped": reason})
            if report.finished:
                return 0
            why = report.lost or report.bye or "the stream ended without a goodbye"
            if time.monotonic() >= deadline:
                raise ConnectionLost(f"connection ended before the last round: {why}")
            await asyncio.sleep(1.0)
            if report.rounds:  # made progress: the retry window starts again
                deadline = time.monotonic() + retry

    return asyncio.run(session())

