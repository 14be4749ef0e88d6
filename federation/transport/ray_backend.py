"""Ray backend: many simulated clients as Ray actors, the server session in the driver.

Theory of operation
-------------------
Each Ray actor (a :class:`_Pool`) hosts a batch of clients and their sans-IO
:class:`~secagg.protocol.client.ClientSession` objects -- one actor per CPU, not one per
client: a Python process per client would cost ~100 MB each, so 1,000 clients would not
fit one machine, while the protocol only needs each client's state and keys to live apart
from the server's. The driver runs the :class:`~secagg.protocol.server.ServerSession`
and, stage by stage, sends every actor the sealed server messages for its clients and
feeds their sealed replies back. Actors and driver exchange only the protocol's sealed
wire bytes (``dict[int, bytes]``), exactly what the gRPC transport carries; Ray's own
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

import numpy as np

from secagg.errors import ConfigError, SecAggError

log = logging.getLogger("secagg.ray")


def _require_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backend needs Ray: pip install 'secagg[ray]'") from None
    return ray


class _Pool:
    """Body of the ClientPool actor (a plain class so it can also run without Ray)."""

    def __init__(self, client_ids: Sequence[int], seed: int | None = None) -> None:
        from secagg.keys import IdentityKey

        self._ids = tuple(int(c) for c in client_ids)
        self.seed = seed
        self.identities = {c: IdentityKey.generate() for c in self._ids}
        self.sessions: dict = {}
        self.drop: dict[str, set[int]] = {}

    def client_ids(self) -> tuple[int, ...]:
        return self._ids

    def peak_rss_kib(self) -> int:
        """Peak resident memory of this process (Linux /proc), for benchmarks."""
        return _peak_rss_kib()

    def public_keys(self) -> dict[int, bytes]:
        return {c: k.public_bytes for c, k in self.identities.items()}

    def begin(
        self,
        directory: Mapping[int, bytes],
        updates: Mapping[int, bytes] | None,
        synthetic: tuple[int, int, int, float] | None,
        drop: Mapping[str, Sequence[int]],
    ) -> int:
        """New round: one session per hosted client. ``updates`` are float64 bytes by client;
        ``synthetic`` = (dim, base_seed, round, scale) makes them here instead."""
        from secagg.protocol.client import ClientSession

        self.sessions = {}
        self.drop = {s: set(ids) & set(self._ids) for s, ids in drop.items()}
        for c in self._ids:
            if c not in directory:  # a pool may host more clients than this round uses
                continue
            if updates is not None:
                x = np.frombuffer(updates[c], dtype="<f8")
            else:
                from federation.transport.config import synthetic_update

                dim, base, rnd, scale = synthetic  # type: ignore[misc]
                x = synthetic_update(dim, base + c, rnd, scale).astype(np.float64)
            self.sessions[c] = ClientSession(
                c, self.identities[c], directory, update=x,
                rounding_seed=None if self.seed is None else _rounding_seed(self.seed, c),
            )
        return len(self.sessions)

    def upload_bytes(self) -> dict[int, int]:
        """Bytes each hosted client sent this round (every stage, sealed)."""
        return {c: s.upload_bytes for c, s in self.sessions.items()}

    def step(self, stage: str, inbox: Mapping[int, bytes]) -> tuple[dict[int, bytes], dict[int, str], float]:
        """Hand each hosted client its server message; return sealed replies, failures, seconds."""
        started = time.process_time()
        out: dict[int, bytes] = {}
        failed: dict[int, str] = {}
        for c, data in inbox.items():
            if c in self.drop.get(stage, ()):
                self.sessions.pop(c, None)  # simulated dropout: the client vanishes here
                continue
            session = self.sessions.get(c)
            if session is None:
                continue
            try:
                out[c] = session.receive(data)
            except SecAggError as exc:
                failed[c] = f"{type(exc).__name__}: {exc}"
                self.sessions.pop(c, None)
        return out, failed, time.process_time() - started


def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rounding_seed(seed: int, client: int) -> bytes:
    # The in-process simulation's derivation (secagg.protocol.simulate), so both agree.
    from secagg.protocol.simulate import _rounding_seed as derive_rounding_seed

    return derive_rounding_seed(seed, client)


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
    """One masking round with clients on Ray actors; returns the released total and figures.

    The round is planned like every other (:func:`~secagg.protocol.mode.plan_from_options`):
    ``threshold`` is a floor, raised to the secure minimum.

    Give ``updates`` (an (n, d) array; client ``c`` holds row ``c-1``) or ``n_clients`` and
    ``dim`` for synthetic updates generated inside the actors. ``dropouts`` maps a stage
    name to client ids that vanish at that stage. ``pools`` reuses actors across rounds.
    """
    ray = _require_ray()
    from secagg.keys import IdentityKey
    from secagg.protocol.common import SERVER_ID
    from secagg.protocol.mode import codec_from_options, plan_from_options
    from secagg.protocol.server import ServerSession, ServerState

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
    directory = {SERVER_ID: server_identity.public_bytes}
    owners: dict[int, object] = {}
    wanted = set(ids)
    for (pool, _), keys in zip(pools, ray.get([p.public_keys.remote() for p, _ in pools])):
        for c, key in keys.items():
            if c in wanted:
                directory[c] = key
                owners[c] = pool
    if len(owners) != len(ids):
        raise ConfigError(f"the actor pools host {len(owners)} of the round's {len(ids)} clients")
    config = plan_from_options(ids, opts, threshold)
    server = ServerSession(config, server_identity, directory)
    drop = {k: list(v) for k, v in (dropouts or {}).items()}
    synthetic = (dim, int(opts.get("input_seed", 0)), round_, float(opts.get("input_scale", 1.0)))
    ray.get([
        p.begin.remote(
            directory,
            None if updates is None else {c: updates[c - 1].astype("<f8").tobytes() for c in hosted if c in wanted},
            None if updates is not None else synthetic,
            drop,
        )
        for p, hosted in pools
    ])
    setup_s = time.perf_counter() - t0
    failed: dict[int, str] = {}
    client_cpu = 0.0
    masked_bytes = 0
    out = server.start()
    while server.state is ServerState.COLLECTING:
        stage = server.stage.value
        by_pool: dict[object, dict[int, bytes]] = {}
        for c, data in out.items():
            by_pool.setdefault(owners[c], {})[c] = data
        results = ray.get([p.step.remote(stage, inbox) for p, inbox in by_pool.items()])
        for replies, fails, cpu in results:
            failed.update(fails)
            client_cpu += cpu
            for c, data in replies.items():
                if stage == "masked_input":
                    masked_bytes += len(data)
                try:
                    server.receive(data)
                except SecAggError as exc:
                    failed[c] = f"{type(exc).__name__}: {exc}"
        out = server.close_stage()
    seconds = time.perf_counter() - t0
    sent: dict[int, int] = {}
    for part in ray.get([p.upload_bytes.remote() for p, _ in pools]):
        sent.update(part)
    uploads = [sent.get(c, 0) for c in server.included]
    return {
        "total": server.result,
        "included": server.included,
        "dropped_at": dict(server.dropped_at),
        "failed": failed,
        "round_seconds": seconds,
        "setup_seconds": setup_s,
        "client_cpu_seconds": client_cpu,
        "server_timings": dict(server.timings),
        "degree": config.degree,
        "threshold": config.threshold,
        # the in-process engine's definition: all sealed bytes a counted client sent, per parameter
        "upload_bytes_per_param": float(np.mean(uploads)) / dim if uploads else 0.0,
        "masked_input_bytes_per_param": masked_bytes / max(len(server.included), 1) / dim,
        "codec": codec_from_options(opts, n_clients),
    }


def make_pools(ids: Sequence[int], *, num_actors: int | None = None, seed: int | None = None) -> list:
    """Start the client-pool actors and split ``ids`` among them; return (actor, ids) pairs."""
    ray = _require_ray()
    if not ray.is_initialized():
        raise ConfigError("Ray is not initialised; call start_ray() or ray.init() first")
    k = num_actors or max(1, int(ray.available_resources().get("CPU", 1)))
    k = min(k, len(ids))
    batches = [tuple(b) for b in np.array_split(np.asarray(ids), k) if len(b)]
    actor = ray.remote(num_cpus=0)(_Pool)
    return [(actor.remote([int(c) for c in b], seed), tuple(int(c) for c in b)) for b in batches]


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start a new local Ray or join the cluster at ``address`` (see :mod:`.ray_cluster`); True if this call did."""
    from federation.transport.ray_cluster import connect

    return connect(address, num_cpus)


def run_ray_rounds(
    *,
    n_clients: int,
    mode: str,
    options: Mapping[str, object],
    rounds: int,
    threshold: int | None,
    address: str | None = None,
    num_cpus: int | None = None,
    seed: int | None = None,
) -> Iterator[dict]:
    """`secagg serve --backend ray`: ``rounds`` masking rounds over synthetic client updates."""
    if mode != "masking":
        raise ConfigError(f"the Ray backend runs the masking protocol; mode {mode!r} is not supported yet")
    ray = _require_ray()
    started = start_ray(address, num_cpus)
    try:
        dim = int(options.get("dim", 0))
        pools = make_pools(tuple(range(1, n_clients + 1)), seed=seed)
        for r in range(rounds):
            res = run_ray_round(n_clients=n_clients, dim=dim, options=options, threshold=threshold,
                                seed=seed, round_=r, pools=pools)
            yield {
                "round": r, "ok": True, "clients": n_clients, "included": len(res["included"]),
                "degree": res["degree"], "threshold": res["threshold"],
                "seconds": round(res["round_seconds"], 3), "norm": float(np.linalg.norm(res["total"])),
            }
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- federation engine


class RayExecutor:
    """:class:`federation.engine.ClientExecutor` that trains the round's clients as Ray tasks.

    ``Federation(config, executor=RayExecutor())``: each :class:`~federation.engine.TrainTask`
    (plain values and the model builder) runs in a Ray worker; results come back in task order.
    """

    def __init__(self, *, num_cpus_per_task: float = 1.0) -> None:
        ray = _require_ray()
        if not ray.is_initialized():
            raise ConfigError("Ray is not initialised; call start_ray() or ray.init() first")
        from federation.engine import run_task

        self._run = ray.remote(num_cpus=num_cpus_per_task)(run_task)

    def run(self, tasks):
        ray = _require_ray()
        return ray.get([self._run.remote(t) for t in tasks])


class RayAggregator:
    """:class:`federation.aggregators.Aggregator` running the masking protocol with Ray actors.

    Drop-in for the engine's in-process ``SecureAggregator`` ("masking" or "masking-sparse"):
    the round's clients run their protocol sessions in actor pools, the server session in
    this process. With the same ``seed`` the released sum is bit-identical to the in-process
    aggregator's (same encoding and rounding; masks cancel exactly).
    """

    def __init__(self, name: str = "masking", *, threshold: int | None = None, bits: int = 32,
                 seed: int | None = None, num_actors: int | None = None) -> None:
        if name not in ("masking", "masking-sparse"):
            raise ConfigError(f"the Ray aggregator runs masking or masking-sparse, not {name!r}")
        self.name = name
        self.threshold, self.bits, self.seed, self.num_actors = threshold, bits, seed, num_actors
        self._pools: list | None = None
        self._capacity = 0

    def aggregate(self, vectors: np.ndarray, *, dropouts: Mapping[str, Sequence[int]], clip: float | None,
                  **protocol_options):
        from secagg.result import AggregateResult

        if protocol_options:
            raise ConfigError(
                f"the Ray aggregator does not support {sorted(protocol_options)} (distributed DP noise) yet; "
                "use the in-process aggregator for dp = 'user-distributed'"
            )
        matrix = np.asarray(vectors, dtype=np.float64)
        n = matrix.shape[0]
        if clip is None:  # as secagg.aggregate: the range is the batch's largest |coordinate|
            options = {"clip": float(np.max(np.abs(matrix))) or 1.0, "clip_mode": "coordinate"}
        else:
            options = {"clip": float(clip), "clip_mode": "l2"}
        options.update(bits=self.bits, graph="sparse" if self.name == "masking-sparse" else "complete")
        gone = len({int(r) for rows in dropouts.values() for r in rows})
        options["dropout"] = min(max(gone / n, 0.0), 0.5)
        if self._pools is None or self._capacity < n:
            self._pools = make_pools(tuple(range(1, n + 1)), num_actors=self.num_actors, seed=self.seed)
            self._capacity = n
        res = run_ray_round(
            matrix, options=options, threshold=self.threshold, pools=self._pools, seed=self.seed,
            dropouts={s: [int(r) + 1 for r in rows] for s, rows in dropouts.items() if rows},
        )
        timings = dict(res["server_timings"])
        timings["client.cpu_total"] = res["client_cpu_seconds"]
        return AggregateResult(
            total=res["total"],
            included=tuple(c - 1 for c in res["included"]),
            bytes_up_per_param=res["upload_bytes_per_param"],
            timings=timings,
            protocol="masking",
            max_quantization_error=res["codec"].sum_error_bound(len(res["included"])),
            dropped={s: tuple(c - 1 for c in ids) for s, ids in res["dropped_at"].items() if ids},
        )
