"""Ray backend: many simulated clients as Ray actors, the server session in the driver.

Theory of operation
-------------------
Each Ray actor (a :class:`_Pool`) hosts a batch of parties and their sans-IO sessions
(masking clients; ckks clients and key holders) -- one actor per CPU, not one per
client: a Python process per client would cost ~100 MB each, so 1,000 clients would not
fit one machine, while the protocol only needs each client's state and keys to live apart
from the server's. The driver runs the server round through the one round loop,
:func:`secagg.rounds.drive`; :class:`RayLink` is only the link: stage by stage it sends
every actor the messages for its parties in a few batched calls and hands the replies
back as they arrive. Actors and driver exchange only the protocol's sealed wire bytes
(``dict[int, bytes]``), exactly what the gRPC transport carries; Ray's own
serialisation moves them inside one trusted cluster.

Same results as the in-process engine: with ``seed`` set, client ``c`` (row ``c-1``)
uses the same stochastic-rounding seed as :func:`secagg.aggregate(..., seed=seed)`, and
the masks cancel exactly, so the released sum is bit-identical to the in-process run on
the same updates (tests/test_ray_backend.py checks it). Keys and masks still come from
the OS CSPRNG.

Use a new local Ray (started and stopped here, ``num_cpus``) or an existing cluster
(``address="HOST:PORT"`` or ``"auto"``; token authentication and shipping the package to
the workers are handled in :mod:`federation.transport.ray_cluster`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from federation.aggregators import PROTECTION_MODES
from federation.transport.ray_cluster import connect as start_ray  # public: start or join Ray
from federation.transport.ray_cluster import require_ray
from secagg.errors import ConfigError, SecAggError
from secagg.protocol.pool import ClientPool

if TYPE_CHECKING:
    from secagg.rounds import Reply, StageView

log = logging.getLogger("secagg.ray")


class _Pool(ClientPool):
    """Body of the ClientPool actor (a plain class so it can also run without Ray).

    It hosts the sessions of a batch of parties (:class:`secagg.protocol.pool.ClientPool`):
    masking clients, or ckks clients and key holders (:mod:`secagg.ckks.session`). A
    party's identity key is made here and never leaves. A party that raises any typed
    error stops and is reported as gone, as a remote client would be.
    """

    def __init__(self, client_ids: Sequence[int], seed: int | None = None) -> None:
        from secagg.rounds import PhaseTimes

        super().__init__(client_ids, seed=seed, stops=(SecAggError,))
        self.times = PhaseTimes()

    def peak_rss_kib(self) -> int:
        """Peak resident memory of this process (Linux /proc), for benchmarks."""
        return _peak_rss_kib()

    def cpu_seconds(self) -> float:
        """CPU time of this whole process (user + system, Ray's own work included), for benchmarks."""
        t = os.times()
        return t.user + t.system

    def begin(  # type: ignore[override]
        self,
        directory: Mapping[int, bytes],
        updates: Mapping[int, bytes] | None,
        synthetic: tuple[int, int, int, float] | None,
        drop: Mapping[str, Sequence[int]],
    ) -> int:
        """New masking round: one session per hosted client in ``directory``. ``updates`` are
        float64 bytes by client; ``synthetic`` = (dim, base_seed, round, scale) makes them here
        instead. ``drop`` maps a stage to the clients that vanish there."""
        rows = {c: _update_of(c, updates, synthetic) for c in self.client_ids() if c in directory}
        return super().begin(directory, rows, drop)

    def begin_ckks(self, config, roster, updates: Mapping[int, bytes], fractions: Mapping[int, float]) -> int:
        """New ckks round (:class:`~secagg.ckks.roles.HeRoundConfig`, :class:`~secagg.ckks.session.Roster`):
        a key-holder session for each hosted key holder, a client session for each hosted
        participant in ``updates`` (float64 bytes; the others never upload)."""
        from secagg.ckks.session import ClientSession, KeyHolderSession

        self.sessions, self.drop = {}, {}
        for c in self.client_ids():
            if c in roster.keyholders:
                self.sessions[c] = KeyHolderSession(config, roster, c, self.identities[c], timer=self.times)
            elif c in updates:
                self.sessions[c] = ClientSession(config, roster, c, self.identities[c], _update_of(c, updates, None),
                                                 weight=fractions.get(c), timer=self.times)
        return len(self.sessions)

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per timed phase (ckks sessions) since the pool started; resets the count."""
        seconds = dict(self.times.seconds)
        self.times.seconds.clear()
        return seconds


def _update_of(c: int, updates: Mapping[int, bytes] | None, synthetic: tuple[int, int, int, float] | None) -> np.ndarray:
    if updates is not None:
        return np.frombuffer(updates[c], dtype="<f8")
    from federation.transport.config import synthetic_update

    dim, base, rnd, scale = synthetic  # type: ignore[misc]
    return synthetic_update(dim, base + c, rnd, scale).astype(np.float64)


def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RayLink:
    """:class:`secagg.rounds.Link` to parties hosted on Ray actors; the driver is :func:`secagg.rounds.drive`.

    The link only moves bytes: :meth:`deliver` groups the stage's messages by actor and
    sends each actor its batch in a few chunks (one Ray call per chunk, never one per
    message); :meth:`replies` yields the replies as each chunk comes back, so the driver
    checks the first replies while the actors still compute the rest, and reports each
    party that stopped on its actor (simulated dropout, refused message) as a
    ``Reply(id, None, reason)``. It also counts what a link sees: the actors' CPU seconds
    and the bytes received per stage.
    """

    def __init__(self, owners: Mapping[int, object], *, chunks_per_actor: int = 4) -> None:
        self.owners = owners
        self.chunks_per_actor = max(1, int(chunks_per_actor))
        self.client_cpu = 0.0
        self.received_bytes: dict[str, int] = {}
        self._gone: set[int] = set()
        self._pending: list = []

    def deliver(self, stage: StageView, outgoing: Mapping[int, bytes]) -> None:
        by_actor: dict[object, list[int]] = {}
        for c in outgoing:
            if c not in self._gone:
                by_actor.setdefault(self.owners[c], []).append(c)
        self._pending = [
            actor.step.remote(stage.name, {int(c): outgoing[int(c)] for c in part})
            for actor, ids in by_actor.items()
            for part in np.array_split(np.asarray(ids), min(self.chunks_per_actor, len(ids)))
        ]

    def replies(self, stage: StageView) -> Iterator[Reply]:
        from secagg.rounds import Reply

        ray = require_ray()
        while self._pending:
            done, self._pending = ray.wait(self._pending, num_returns=1)
            replies, stopped, cpu = ray.get(done[0])
            self.client_cpu += cpu
            self.received_bytes[stage.name] = self.received_bytes.get(stage.name, 0) + sum(map(len, replies.values()))
            for c, reason in stopped.items():
                self._gone.add(c)
                yield Reply(c, None, reason)
            for c, payload in replies.items():
                yield Reply(c, payload)

    def drop(self, client: int, reason: str) -> None:
        self._gone.add(client)  # its actor session stays idle: nothing more is delivered to it


def _hosts(pools: list, ids: Sequence[int]) -> tuple[dict[int, bytes], dict[int, object]]:
    """Identity keys and hosting actor of every party in ``ids``."""
    ray = require_ray()
    keys: dict[int, bytes] = {}
    owners: dict[int, object] = {}
    wanted = set(ids)
    try:
        listed = ray.get([p.public_keys.remote() for p, _ in pools])
    except ray.exceptions.RayError as exc:  # the actors could not start (first call that waits on them)
        missing = next((line.strip() for line in str(exc).splitlines() if "ModuleNotFoundError" in line), None)
        if missing is None:
            raise
        raise ConfigError(f"the Ray workers cannot start the client actors ({missing}): install the package's "
                          "third-party dependencies (and Ray) on every node of the cluster") from None
    for (pool, _), hosted in zip(pools, listed):
        for c, key in hosted.items():
            if c in wanted:
                keys[c], owners[c] = key, pool
    if len(owners) != len(wanted):
        raise ConfigError(f"the actor pools host {len(owners)} of the round's {len(wanted)} parties")
    return keys, owners


def run_ray_round(
    updates: np.ndarray | None = None,
    *,
    n_clients: int | None = None,
    dim: int | None = None,
    options: Mapping[str, object],
    threshold: int | None = None,
    dropouts: Mapping[str, Sequence[int]] | None = None,
    seed: int | None = None,
    round_: int = 0,
    pools: list | None = None,
    num_actors: int | None = None,
) -> dict:
    """One masking round with clients on Ray actors; returns its :class:`~secagg.rounds.RoundOutcome` (``"outcome"``) and figures.

    The round is planned like every other (:func:`~secagg.protocol.mode.plan_from_options`):
    ``threshold`` is a floor, raised to the secure minimum.

    Give ``updates`` (an (n, d) array; client ``c`` holds row ``c-1``) or ``n_clients`` and
    ``dim`` for synthetic updates generated inside the actors. ``dropouts`` maps a stage
    name to client ids that vanish at that stage. ``pools`` reuses actors across rounds.
    """
    ray = require_ray()
    from secagg.keys import IdentityKey
    from secagg.protocol.common import SERVER_ID
    from secagg.protocol.mode import MaskingServerRound, plan_from_options
    from secagg.protocol.server import ServerSession
    from secagg.rounds import PhaseTimes, drive

    if updates is not None:
        updates = np.asarray(updates, dtype=np.float64)
        n_clients, dim = updates.shape
    if not n_clients or not dim:
        raise ConfigError("give updates, or n_clients and dim")
    ids = tuple(range(1, n_clients + 1))
    opts = dict(options)
    opts["dim"] = dim
    if pools is None:
        pools = make_pools(ids, num_actors=num_actors, seed=seed)
    t0 = time.perf_counter()
    server_identity = IdentityKey.generate()
    keys, owners = _hosts(pools, ids)
    directory = {SERVER_ID: server_identity.public_bytes, **keys}
    config = plan_from_options(ids, opts, threshold)
    server = MaskingServerRound(ServerSession(config, server_identity, directory))
    drop = {k: list(v) for k, v in (dropouts or {}).items()}
    synthetic = (dim, int(opts.get("input_seed", 0)), round_, float(opts.get("input_scale", 1.0)))
    ray.get([
        p.begin.remote(
            directory,
            None if updates is None else {c: updates[c - 1].astype("<f8").tobytes() for c in hosted if c in owners},
            None if updates is not None else synthetic,
            drop,
        )
        for p, hosted in pools
    ])
    setup_s = time.perf_counter() - t0
    link = RayLink(owners)
    times = PhaseTimes()
    outcome = drive(server, link, timer=times)
    seconds = time.perf_counter() - t0
    return {
        "outcome": outcome,
        "round_seconds": seconds,
        "setup_seconds": setup_s,
        "client_cpu_seconds": link.client_cpu,
        "server_timings": {**server.session.timings, **times.seconds},
        "degree": config.degree,
        "threshold": config.threshold,
        "graph": server.session.graph,  # public: what a benchmark prices the round's floor from
        # the in-process engine's definition: all sealed bytes a counted client sent, per parameter
        "upload_bytes_per_param": outcome.bytes_up_per_param,
        "masked_input_bytes_per_param": link.received_bytes.get("masked_input", 0) / max(len(outcome.included), 1) / dim,
    }


def run_ray_ckks_round(
    updates: np.ndarray, *, pools: list | None = None, num_actors: int | None = None, **options
):
    """One ckks (or BFV) round with the clients and the key holder(s) on Ray actors.

    Same arguments and result as :func:`secagg.aggregate(updates, protection="ckks", ...)
    <secagg.aggregate>` (``options``: ``clip``, ``dropouts``, ``weights``, ``scheme``,
    ``value_bound``, ``min_clients``, ``key_holders``, ...): row ``i`` is party ``i``, the
    key holders are parties ``n``, ``n+1``, ... (as in process), each on the actor that
    hosts its id, and the server runs in this process. ``pools`` (from :func:`make_pools`
    over ids ``0 .. n+key_holders-1``) reuses actors across rounds.
    """
    ray = require_ray()
    from secagg.ckks.mode import CkksServerRound
    from secagg.ckks.session import Roster, ServerSession
    from secagg.ckks.simulate import ckks_result, plan_ckks
    from secagg.keys import IdentityKey
    from secagg.rounds import PhaseTimes, drive

    known = {"clip", "dropouts", "weights", "scheme", "params", "value_bound", "min_clients",
             "release_grid_bits", "key_holders"}
    plan = plan_ckks(updates, **{k: v for k, v in options.items() if k in known},
                     unsupported={k: v for k, v in options.items() if k not in known})
    n, k = plan.x.shape[0], plan.round.key_holders
    ids = tuple(range(n + k))
    if pools is None:
        pools = make_pools(ids, num_actors=num_actors)
    keys, owners = _hosts(pools, ids)
    server_identity = IdentityKey.generate()
    roster = Roster(0, tuple(range(n)), tuple(range(n, n + k)), {i: keys[i] for i in range(n)},
                    tuple(keys[h] for h in range(n, n + k)), server_identity.public_bytes)
    fractions = {} if plan.fractions is None else {i: float(f) for i, f in enumerate(plan.fractions)}
    ray.get([
        p.begin_ckks.remote(plan.round, roster,
                            {c: plan.x[c].astype("<f8").tobytes() for c in hosted if c < n and c not in plan.skip},
                            fractions)
        for p, hosted in pools
    ])
    times = PhaseTimes()
    server = CkksServerRound(ServerSession(plan.round, roster, server_identity, timer=times))
    link = RayLink(owners)
    drive(server, link, timer=times)
    for seconds in ray.get([p.phase_seconds.remote() for p, _ in pools]):
        times.add(seconds)
    result = ckks_result(plan, server.session, server.session.outcome(), times)
    result.timings["client.cpu_total"] = link.client_cpu
    return result


def make_pools(ids: Sequence[int], *, num_actors: int | None = None, seed: int | None = None) -> list:
    """Start the client-pool actors and split ``ids`` among them; return (actor, ids) pairs."""
    ray = require_ray(initialized=True)
    k = num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
    k = min(k, len(ids))
    batches = [tuple(b) for b in np.array_split(np.asarray(ids), k) if len(b)]
    actor = ray.remote(num_cpus=0)(_Pool)
    return [(actor.remote([int(c) for c in b], seed), tuple(int(c) for c in b)) for b in batches]


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the ``with`` block: :func:`start_ray`, and a Ray this call started stops after it."""
    started = start_ray(address, num_cpus)
    try:
        yield
    finally:
        if started:
            require_ray().shutdown()


def run_ray_rounds(
    *,
    n_clients: int,
    protection: str,
    options: Mapping[str, object],
    rounds: int,
    threshold: int | None,
    address: str | None = None,
    num_cpus: int | None = None,
    seed: int | None = None,
) -> Iterator[dict]:
    """`secagg serve --backend ray`: ``rounds`` masking or ckks rounds over synthetic client updates.

    ckks: ``options["clip"]`` is the per-coordinate bound every client enforces (as over
    gRPC), ``scheme`` "ckks" or "bfv"; the key holder is one more party on an actor, and
    the round needs ``max(2, threshold)`` uploads.
    """
    if protection not in ("masking", "ckks"):
        raise ConfigError(f"the Ray backend runs the masking and ckks protocols; protection {protection!r} "
                          "is not supported")
    from federation.transport.config import synthetic_update

    ckks = protection == "ckks"
    dim, bound = int(options.get("dim", 0)), None
    if ckks:
        from secagg.ckks.mode import dim_and_bound

        dim, bound = dim_and_bound(options)
    base, scale = int(options.get("input_seed", 0)), float(options.get("input_scale", 1.0))
    with ray_session(address, num_cpus):
        # masking: clients 1..n; ckks: clients 0..n-1 and the key holder n
        pools = make_pools(tuple(range(n_clients + 1)) if ckks else tuple(range(1, n_clients + 1)), seed=seed)
        for r in range(rounds):
            started, figures = time.perf_counter(), {}
            if ckks:  # client c's synthetic update is the one `secagg join` client c would send (ids from 1)
                x = np.stack([np.clip(synthetic_update(dim, base + c + 1, r, scale), -bound, bound)
                              for c in range(n_clients)])
                out = run_ray_ckks_round(x, pools=pools, value_bound=bound, scheme=str(options.get("scheme", "ckks")),
                                         min_clients=max(2, int(threshold or 2)))
                figures["max_error"] = out.max_quantization_error
            else:
                res = run_ray_round(n_clients=n_clients, dim=dim, options=options, threshold=threshold,
                                    seed=seed, round_=r, pools=pools)
                out, figures = res["outcome"], {"degree": res["degree"], "threshold": res["threshold"]}
            yield {"round": r, "ok": True, "clients": n_clients, "included": len(out.included), **figures,
                   "seconds": round(time.perf_counter() - started, 3), "norm": float(np.linalg.norm(out.total))}


# --------------------------------------------------------------------------- federation engine


class RayExecutor:
    """:class:`federation.engine.ClientExecutor` that trains the round's clients as Ray tasks.

    ``Federation(config, executor=RayExecutor())``: each :class:`~federation.engine.TrainTask`
    (plain values and the model builder) runs in a Ray worker; results come back in task order.
    """

    def __init__(self, *, num_cpus_per_task: float = 1.0) -> None:
        ray = require_ray(initialized=True)
        from federation.engine import run_task

        self._run = ray.remote(num_cpus=num_cpus_per_task)(run_task)

    def run(self, tasks):
        ray = require_ray()
        return ray.get([self._run.remote(t) for t in tasks])


def ray_federation(config):
    """The federation engine with its clients trained as Ray tasks and aggregated by Ray actors.

    The one place that decides what runs on Ray (``secagg run`` and ``secagg serve`` with
    ``--backend ray``): the protocol's parties do for masking, masking-sparse and ckks;
    distributed DP noise (``dp = "user-distributed"``) and ``protection = "none"`` keep the
    in-process aggregator. Ray must be initialised (:func:`start_ray`).
    """
    from federation.engine import Federation

    aggregator = None
    if config.protection in ("masking", "masking-sparse", "ckks") and config.dp != "user-distributed":
        aggregator = RayAggregator(config.protection, threshold=config.threshold, bits=config.bits,
                                   seed=config.seed if config.deterministic else None)
    return Federation(config, executor=RayExecutor(), aggregator=aggregator)


class RayAggregator:
    """:class:`federation.aggregators.Aggregator` running the protocol's parties on Ray actors.

    Drop-in for the engine's in-process ``SecureAggregator`` ("masking", "masking-sparse" or
    "ckks"): the round's clients (and the ckks key holder) run their protocol sessions in
    actor pools, the server session in this process. With the same ``seed`` a masking sum
    is bit-identical to the in-process aggregator's (same encoding and rounding; masks
    cancel exactly); a ckks sum agrees within its error bound (encryption noise is fresh).
    """

    def __init__(self, name: str = "masking", *, threshold: int | None = None, bits: int = 32,
                 seed: int | None = None, num_actors: int | None = None) -> None:
        if name not in ("masking", "masking-sparse", "ckks"):
            raise ConfigError(f"the Ray aggregator runs masking, masking-sparse or ckks, not {name!r}")
        self.name = name
        self.threshold, self.bits, self.seed, self.num_actors = threshold, bits, seed, num_actors
        self._pools: list | None = None
        self._hosted: set[int] = set()

    def _pools_for(self, ids: Sequence[int]) -> list:
        if self._pools is None or not set(ids) <= self._hosted:
            self._pools = make_pools(ids, num_actors=self.num_actors, seed=self.seed)
            self._hosted = set(ids)
        return self._pools

    def aggregate(self, vectors: np.ndarray, *, dropouts: Mapping[str, Sequence[int]], clip: float | None,
                  **protocol_options):
        matrix = np.asarray(vectors, dtype=np.float64)
        n = matrix.shape[0]
        if self.name == "ckks":
            drops = {s: [int(r) for r in rows] for s, rows in dropouts.items() if rows}
            return run_ray_ckks_round(matrix, pools=self._pools_for(range(n + 1)), dropouts=drops, clip=clip,
                                      **protocol_options)
        if protocol_options:
            raise ConfigError(
                f"the Ray aggregator does not support {sorted(protocol_options)} (distributed DP noise) yet; "
                "use the in-process aggregator for dp = 'user-distributed'"
            )
        if clip is None:  # as secagg.aggregate: the range is the batch's largest |coordinate|
            options = {"clip": float(np.max(np.abs(matrix))) or 1.0, "clip_mode": "coordinate"}
        else:
            options = {"clip": float(clip), "clip_mode": "l2"}
        options.update(bits=self.bits, **PROTECTION_MODES[self.name][1])
        gone = len({int(r) for rows in dropouts.values() for r in rows})
        options["dropout"] = min(max(gone / n, 0.0), 0.5)
        res = run_ray_round(
            matrix, options=options, threshold=self.threshold, pools=self._pools_for(range(1, n + 1)),
            seed=self.seed, dropouts={s: [int(r) + 1 for r in rows] for s, rows in dropouts.items() if rows},
        )
        outcome = res["outcome"]  # client c is row c - 1
        return replace(outcome, included=tuple(c - 1 for c in outcome.included),
                       dropped={s: tuple(c - 1 for c in ids) for s, ids in outcome.dropped.items()},
                       reasons={c - 1: why for c, why in outcome.reasons.items()},
                       timings={**res["server_timings"], "client.cpu_total": res["client_cpu_seconds"]})
