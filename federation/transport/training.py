"""Federated training over gRPC: the federation engine with its clients on other hosts.

:class:`GrpcFederation` is the in-process :class:`~federation.engine.Federation` with the
round's two seams replaced (:class:`HostClients` trains, :class:`GrpcAggregation`
aggregates): instead of training clients and aggregating in this process, a round
broadcasts the global model to the connected clients, each client trains on its own data
(:class:`TrainingClient`), encodes its update exactly as the engine does
(``[w * clip(delta), w]``, or ``clip(delta)`` for user-level DP) and hands it to the
protocol session (masking or CKKS) -- the server receives only the sum. Everything else is
the engine's, unchanged: write-ahead privacy ledger (a round's spend is reserved before
the broadcast and committed before any client receives the result; one reservation per
release, so a re-run after a crash is reserved again), the server step of the strategy, evaluation, and
the checkpoint after every round. Kill the server at any point and run the same command
again: it resumes after the last checkpointed round.

Both sides read the same experiment TOML; the broadcast carries the config fingerprint
and a client refuses to train for a different experiment. Participants are the clients
that are connected (the engine's sampling settings do not apply); ``expected_clients``
in server.toml says how many to wait for.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from federation.aggregators import PROTECTION_MODES
from federation.config import ExperimentConfig
from federation.engine import (
    Aggregated,
    Cohort,
    Federation,
    Release,
    Trained,
    batch_seed,
    builtin_setup,
    encode_row,
    local_training,
    weighted,
)
from federation.transport.certs import Credentials
from federation.transport.grpc_server import AggregationServer, ServerSettings
from secagg import wire
from secagg.errors import ConfigError, ReplayError



@wire.message
class TrainingBroadcast(wire.Message):
    """Server -> every participant: the global model a round starts from."""

    TYPE = "transport.training.broadcast"
    round: int
    fingerprint: str  # ExperimentConfig.fingerprint(): both sides train the same experiment
    params: bytes  # little-endian float32
    weight_ref: int  # public normaliser of sample weights: w_k = n_k / weight_ref


def protocol_settings(config: ExperimentConfig, settings: ServerSettings, num_params: int) -> None:
    """Set the server's protection and options from the experiment (dimension, clip, bits)."""
    if config.dp == "user-distributed":
        raise ConfigError("dp = 'user-distributed' is not supported over gRPC yet; use 'dpsgd' or 'user'")
    if config.update_clip <= 0:
        raise ConfigError("training over gRPC needs update_clip > 0: the protocol's range is agreed before training")
    try:
        protection, extra = PROTECTION_MODES[config.protection]
    except KeyError:
        raise ConfigError(f"protection {config.protection!r} does not run over gRPC") from None
    weighted_rows = weighted(config)
    settings.protection = protection
    settings.options = {
        **settings.options, **extra,
        "dim": num_params + int(weighted_rows),
        "clip": math.sqrt(config.update_clip**2 + 1.0) if weighted_rows else config.update_clip,
        "bits": config.bits,
    }
    settings.rounds = config.rounds


class HostClients:
    """:class:`~federation.engine.RoundExecutor` whose clients train on their own hosts: every
    connected client takes part (the ledger reserves ``expected_clients``) and trains from the
    broadcast global model inside the protocol round."""

    def __init__(self, expected_clients: int) -> None:
        self.expected_clients = expected_clients

    def cohort(self, fed: Federation, rnd: int) -> Cohort:
        return Cohort([], {}, self.expected_clients)

    def train(self, fed: Federation, rnd: int, cohort: Cohort) -> Trained:
        return Trained(broadcast=wire.encode(TrainingBroadcast(
            round=rnd, fingerprint=fed.config.fingerprint(),
            params=np.asarray(fed.params, dtype="<f4").tobytes(), weight_ref=max(fed.sizes),
        )))


class GrpcAggregation:
    """:class:`~federation.engine.RoundAggregator` of an :class:`AggregationServer`: one
    :meth:`~AggregationServer.run_one_round` per round, whose ``release`` commits the ledger
    before any participant receives the sum."""

    def __init__(self, server: AggregationServer, call: Callable) -> None:
        self.server, self._call, self._first = server, call, True

    def aggregate(self, fed: Federation, rnd: int, cohort: Cohort, trained: Trained,
                  release: Release) -> Aggregated:
        shared: list[np.ndarray] = []

        def release_once(outcome) -> np.ndarray:
            shared.append(release(outcome))
            return shared[0]

        report = self._call(self.server.run_one_round(rnd, first=self._first, broadcast=trained.broadcast,
                                                      release=release_once))
        self._first = False
        if not report.ok or report.outcome is None:
            return Aggregated(list(report.participants), {}, aborted=report.reason)
        outcome = replace(report.outcome, total=shared[0])
        # stage -> clients that stopped answering there, as the in-process engine records it
        return Aggregated(list(report.participants), {s: list(ids) for s, ids in outcome.dropped.items()}, outcome)


class GrpcFederation(Federation):
    """The federation engine whose clients train and protect their updates on their own hosts
    (:class:`HostClients` and :class:`GrpcAggregation`; the round itself is the engine's).

    Every connected client takes part in every round, so no amplification by client sampling
    is claimed: the ledger records q = 1 whatever the experiment's ``sampling_rate``.
    """

    samples_clients = False

    def __init__(self, config: ExperimentConfig, settings: ServerSettings, credentials: Credentials,
                 *, ready=None) -> None:
        super().__init__(config)
        protocol_settings(config, settings, len(self.params))
        self.settings = settings
        self._aio_loop = asyncio.new_event_loop()
        self._aio_thread = threading.Thread(target=self._aio_loop.run_forever, name="secagg-grpc", daemon=True)
        self._aio_thread.start()
        self.server = AggregationServer(settings, credentials)
        self.port = self._call(self.server.start())
        self.round_executor = HostClients(settings.expected_clients)
        self.round_aggregator = GrpcAggregation(self.server, self._call)
        if ready is not None:
            ready(self.port)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._aio_loop).result()

    def close(self, reason: str = "training finished") -> None:
        try:
            self._call(self.server.finish(reason))
            self._call(self.server.stop())
        finally:
            self._aio_loop.call_soon_threadsafe(self._aio_loop.stop)
            self._aio_thread.join(timeout=10)


class TrainingClient:
    """A client's local training for :class:`GrpcFederation` rounds.

    ``client_index`` picks this client's partition of the experiment's dataset (the bundled
    datasets are partitioned the same way on every host). A site with its own private data
    passes ``x``/``y`` instead (``secagg join --app module:function``); its records must fit
    the experiment's model, and under DP-SGD its per-round sampling rate and step count must
    not exceed those the server's privacy ledger accounts for (the worst of the experiment's
    partitions), so the ledger never understates what this site spends.
    """

    def __init__(self, config: ExperimentConfig, client_index: int, *, x=None, y=None) -> None:
        self.config = config
        self.client_index = client_index
        dataset, parts, self.build = builtin_setup(config)
        self.local = local_training(config)
        if x is None:
            if not 0 <= client_index < len(parts):
                raise ConfigError(f"client index {client_index} is outside the experiment's {len(parts)} clients")
            x, y = dataset.x_train[parts[client_index]], dataset.y_train[parts[client_index]]
        else:
            _check_private_data(x, y, dataset, [len(p) for p in parts], self.local)
        self.x, self.y = x, y

    def update(self, round_: int, broadcast: bytes) -> np.ndarray:
        """Train from the broadcast global model; return the row this client protects."""
        from federation.training import train_client

        b = wire.decode(broadcast, expect=TrainingBroadcast)
        if b.round != round_:
            raise ReplayError(f"model broadcast for round {b.round} received in round {round_}")
        if b.fingerprint != self.config.fingerprint():
            raise ConfigError("the server runs a different experiment (config fingerprint differs); "
                              "use the same experiment TOML on both sides")
        params = np.frombuffer(b.params, dtype="<f4").copy()
        c = self.config
        seed = batch_seed(c, round_, self.client_index, secret=True)  # the engine's, reproducible only in tests
        upd = train_client(self.build, params, self.x, self.y, self.local, client=self.client_index, seed=seed)
        # The engine's encoding; a site with more records than the largest partition counts as
        # that many, so the row stays within the bound the protocol's range was agreed for.
        return encode_row(upd, clip=c.update_clip, weight_ref=b.weight_ref, weighted=weighted(c))


def _check_private_data(x: np.ndarray, y: np.ndarray, dataset, sizes: list[int], local) -> None:
    """A site's own records against the experiment: model input, labels, accounted DP-SGD spend."""
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"the site's data has {len(x)} records and {len(y)} labels; give one label per record")
    if tuple(x.shape[1:]) != tuple(dataset.input_shape):
        raise ConfigError(f"the site's records have shape {tuple(x.shape[1:])} but the experiment's model takes "
                          f"{tuple(dataset.input_shape)} ({dataset.name} features)")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= dataset.num_classes:
        raise ConfigError(f"the site's labels must be integer classes 0..{dataset.num_classes - 1}, as in "
                          f"{dataset.name}")
    if local.dp_sgd:
        n = len(y)
        q_max = max(local.sample_rate(m) for m in sizes)
        steps_max = max(local.steps(m) for m in sizes)
        if local.sample_rate(n) > q_max or local.steps(n) > steps_max:
            raise ConfigError(
                f"this site holds {n} records; the server's privacy ledger accounts DP-SGD rounds of at most "
                f"sampling rate {q_max:.4g} and {steps_max} steps (sites of {min(sizes)} to {max(sizes)} records "
                "in the experiment's partition), so this site's spend would be understated. Use an experiment "
                "whose num_clients gives partitions of about this site's size")
