"""Run one real masking round in process: real keys, shares, masks and signed messages.

The round runs through the one driver, :func:`secagg.rounds.drive`, over an
:class:`~secagg.rounds.InMemoryLink`: sealed bytes pass between one :class:`ServerSession`
and n :class:`ClientSession` objects, and the clients the caller asks to drop vanish at
the stage the caller names. What the server learns here is exactly what a deployed server
would learn. :class:`ProcessRound` runs the same round with the clients spread over worker
processes (``aggregate(..., processes=2)``), for rounds whose clients' key agreements need
more than one core; its sum is bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

import numpy as np

from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, InputError
from secagg.keys import IdentityKey
from secagg.protocol.client import ClientSession
from secagg.protocol.common import SERVER_ID, STAGE_NAMES
from secagg.protocol.mode import MaskingServerRound
from secagg.protocol.plan import ClientPolicy, plan_round
from secagg.protocol.pool import ProcessLink, check_processes, rounding_seed
from secagg.protocol.server import ServerSession
from secagg.rounds import InMemoryLink, PhaseTimes, RoundOutcome, drive


class _SimulatedRound:
    """What the simulated rounds share: the plan, the server, and the timings they report.

    ``client_seconds`` / ``client_total_seconds``: each stage's client work, as a mean per
    answering client and summed over them; ``server_receive_seconds``: the server's time to
    take in each stage's messages (signature check, decoding and, for masked inputs, adding
    to the sum), summed over clients.
    """

    def _setup(self, n: int, dim: int, codec: FixedPointCodec, client_keys: Mapping[int, bytes], *, graph: str,
               threshold: int | None, degree: int | None, dropout_hint: float, policy: ClientPolicy | None,
               workers: int) -> None:
        self.client_ids = tuple(range(1, n + 1))
        self.server_identity = IdentityKey.generate()
        self.identities = {SERVER_ID: self.server_identity.public_bytes}
        self.identities.update({c: client_keys[c] for c in self.client_ids})
        self.config = plan_round(self.client_ids, dim, codec, graph=graph, threshold=threshold,
                                 dropout=dropout_hint, degree=degree, policy=policy)
        if self.config.threshold > n:
            raise ConfigError(f"threshold {self.config.threshold} exceeds the number of clients {n}")
        self.server = ServerSession(self.config, self.server_identity, self.identities, workers=workers)
        self.client_seconds: dict[str, float] = {}
        self.client_cpu_seconds: dict[str, float] = {}  # as client_seconds, in CPU time
        self.client_total_seconds: dict[str, float] = {}
        self.server_receive_seconds: dict[str, float] = {}
        self.gone: set[int] = set()

    def _record(self, answered: Mapping[str, int], client_seconds: Mapping[str, float], server: PhaseTimes) -> None:
        for stage, count in answered.items():
            if count:
                self.client_total_seconds[stage] = client_seconds.get(stage, 0.0)
                self.client_seconds[stage] = client_seconds.get(stage, 0.0) / count
                self.server_receive_seconds[stage] = server[f"server.receive.{stage}"]


class InMemoryRound(_SimulatedRound):
    """One server and its clients joined by an in-memory link (a test and simulation harness)."""

    def __init__(self, updates: np.ndarray, codec: FixedPointCodec, *, graph: str = "complete",
                 threshold: int | None = None, degree: int | None = None, dropout_hint: float = 0.1,
                 seed: int | None = None,
                 client_noise: Callable[[int, int, float], np.ndarray] | None = None,
                 policy: ClientPolicy | None = None, workers: int = 1) -> None:
        """``policy`` is every client's (the library default when None); the plan follows it.
        ``workers``: threads each party may use to expand masks (results are bit-identical)."""
        n, dim = updates.shape
        client_identities = {c: IdentityKey.generate() for c in range(1, n + 1)}
        self._setup(n, dim, codec, {c: k.public_bytes for c, k in client_identities.items()}, graph=graph,
                    threshold=threshold, degree=degree, dropout_hint=dropout_hint, policy=policy, workers=workers)
        self.clients = {
            c: ClientSession(
                c, client_identities[c], self.identities, update=updates[c - 1],
                rounding_seed=None if seed is None else rounding_seed(seed, c),
                integer_noise=None if client_noise is None else _bind_row(client_noise, c - 1),
                policy=policy, workers=workers,
            )
            for c in self.client_ids
        }

    def run(self, dropouts: Mapping[str, Sequence[int]] | None = None) -> RoundOutcome:
        """Drive every stage through :func:`secagg.rounds.drive`; ``dropouts`` maps stage -> client
        ids that vanish at that stage. Client times are each party's wall time, summed."""
        clients_cpu = PhaseTimes(time.process_time)
        clients, server = PhaseTimes(also=clients_cpu), PhaseTimes()
        # receive_view: a masked input reaches the server as a view of the buffer it was sealed in
        parties = {c: SimpleNamespace(receive=s.receive_view) for c, s in self.clients.items()}
        link = InMemoryLink(parties, vanish=dropouts, timer=clients)
        outcome = drive(MaskingServerRound(self.server), link, timer=server)
        self.gone |= link.gone
        self._record(link.answered, {stage: clients[f"client.{stage}"] for stage in link.answered}, server)
        # CPU beside wall: only the client being served runs, so the process's CPU time is its own
        self.client_cpu_seconds = {stage: clients_cpu[f"client.{stage}"] / count
                                   for stage, count in link.answered.items() if count}
        return outcome


class ProcessRound(_SimulatedRound):
    """:class:`InMemoryRound` with the clients spread over ``processes`` worker processes.

    The server runs here; each worker hosts a slice of the clients (their identity keys are
    made there) and only sealed wire bytes pass between them (:class:`~secagg.protocol.pool.ProcessLink`).
    With the same ``seed`` the released sum is bit-identical to :class:`InMemoryRound`'s.
    The workers start here (a second or so each, not part of a round's time) and stop when
    :meth:`run` returns; client times are the workers' CPU seconds per stage. Clients use the
    library's default :class:`ClientPolicy` and add no distributed-DP noise (a callback
    would have to be sent to the workers).
    """

    def __init__(self, updates: np.ndarray, codec: FixedPointCodec, *, graph: str = "complete",
                 threshold: int | None = None, degree: int | None = None, dropout_hint: float = 0.1,
                 seed: int | None = None, workers: int = 1, processes: int = 2) -> None:
        n, dim = updates.shape
        self._updates, self._workers = updates, workers
        self._link = ProcessLink(range(1, n + 1), processes=processes, seed=seed)
        keys = self._link.start()
        try:
            self._setup(n, dim, codec, keys, graph=graph, threshold=threshold, degree=degree,
                        dropout_hint=dropout_hint, policy=None, workers=workers)
        except BaseException:
            self._link.close()
            raise

    def run(self, dropouts: Mapping[str, Sequence[int]] | None = None) -> RoundOutcome:
        """As :meth:`InMemoryRound.run`; the workers stop when it returns."""
        server = PhaseTimes()
        with self._link:
            self._link.begin(self.identities, self._updates, dropouts or {}, workers=self._workers)
            outcome = drive(MaskingServerRound(self.server), self._link, timer=server)
        self.gone |= self._link.gone
        self._record(self._link.answered, self._link.cpu_seconds, server)
        self.client_cpu_seconds = dict(self.client_seconds)  # the workers' times are CPU times already
        return outcome


def aggregate_masking(
    updates: np.ndarray,
    *,
    graph: str = "complete",
    threshold: int | None = None,
    dropouts: Mapping[str, Sequence[int]] | None = None,
    clip: float | None = None,
    clip_mode: str = "l2",
    bits: int = 32,
    scale: float | None = None,
    seed: int | None = None,
    weights: Sequence[float] | None = None,
    degree: int | None = None,
    client_noise: Callable[[int, int, float], np.ndarray] | None = None,
    noise_headroom: float = 0.0,
    processes: int = 1,
) -> RoundOutcome:
    """Secure sum by pairwise masking; see :func:`secagg.aggregate` for the arguments.

    ``clip=None`` is a simulation convenience: no clipping, and the fixed-point range is
    the largest |coordinate| of this batch. A deployment fixes ``clip`` in advance, since
    the range must be agreed before anyone sees the updates.

    ``client_noise(row, dim, scale)`` returns client ``row``'s share of distributed DP
    noise in integer units (see ``privacy.distributed``); ``noise_headroom`` is the
    per-coordinate range (in update units) the encoding reserves for it, e.g. ten noise
    standard deviations, so the noisy sum cannot wrap around.

    ``processes`` > 1 spreads the simulated clients over that many worker processes
    (:class:`ProcessRound`; the server stays in this one): the same sum, bit for bit, in
    less wall time when a round's key agreements are its bulk (hundreds of clients). It
    starts processes ("spawn"), so a script that calls it needs an ``if __name__ ==
    "__main__":`` guard, and it cannot run a ``client_noise`` callback.
    """
    check_processes(processes)
    if processes > 1 and client_noise is not None:
        raise ConfigError("processes > 1 cannot run a client_noise callback in the worker processes; "
                          "use processes=1 for distributed DP noise")
    matrix = _check_updates(updates)
    n, dim = matrix.shape
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not np.all(np.isfinite(w)):
            raise InputError(f"weights must be {n} finite numbers, one per client")
        matrix = matrix * w[:, None]
    if clip is None:
        bound = max(float(np.max(np.abs(row))) for row in matrix) or 1.0  # one row's |x| at a time
        codec = _codec(bound, n, bits, "coordinate", scale, noise_headroom)
    else:
        codec = _codec(clip, n, bits, clip_mode, scale, noise_headroom)
    rows_by_stage = _check_dropouts(dropouts, n)
    total_dropped = len(set().union(*rows_by_stage.values())) if rows_by_stage else 0
    hint = min(max(total_dropped / n, 0.0), 0.5)
    if processes > 1:
        session: _SimulatedRound = ProcessRound(matrix, codec, graph=graph, threshold=threshold, degree=degree,
                                                dropout_hint=hint, seed=seed, processes=processes)
    else:
        session = InMemoryRound(matrix, codec, graph=graph, threshold=threshold, degree=degree, dropout_hint=hint,
                                seed=seed, client_noise=client_noise)
    outcome = session.run({stage: [r + 1 for r in rows] for stage, rows in rows_by_stage.items()})
    server = session.server
    included = tuple(c - 1 for c in outcome.included)
    timings = dict(server.timings)
    for stage, seconds in session.client_seconds.items():
        timings[f"client.{stage}"] = seconds
    for stage, seconds in session.server_receive_seconds.items():
        timings[f"server.receive.{stage}"] = seconds
    return RoundOutcome(
        total=outcome.total,
        included=included,
        bytes_up_per_param=outcome.bytes_up_per_param,
        timings=timings,
        protection="masking",
        max_quantization_error=outcome.max_quantization_error,
        dropped={stage: tuple(c - 1 for c in ids) for stage, ids in outcome.dropped.items()},
        parameters={
            "graph": "complete" if session.config.degree >= n - 1 else "sparse",
            "degree": session.config.degree, "threshold": session.config.threshold,
            "bits": codec.bits, "scale": codec.scale, "clip": codec.clip, "clip_mode": codec.clip_mode,
        },
    )


def _codec(clip: float, n: int, bits: int, clip_mode: str, scale: float | None, headroom: float) -> FixedPointCodec:
    if scale is None:
        return FixedPointCodec.for_clients(clip=clip, max_clients=n, bits=bits, clip_mode=clip_mode, headroom=headroom)
    return FixedPointCodec(clip=clip, scale=scale, bits=bits, max_clients=n, clip_mode=clip_mode, headroom=headroom)


def _bind_row(client_noise: Callable[[int, int, float], np.ndarray], row: int) -> Callable[[int, float], np.ndarray]:
    return lambda dim, scale: client_noise(row, dim, scale)


def _check_updates(updates: np.ndarray) -> np.ndarray:
    try:
        matrix = np.asarray(updates)
        if not np.issubdtype(matrix.dtype, np.floating):
            matrix = matrix.astype(np.float64)  # float32/float64 inputs are used as they are, no copy
    except (TypeError, ValueError):
        raise InputError("updates must be a numeric (n_clients, dim) array") from None
    if matrix.ndim != 2:
        raise InputError(f"updates must be a 2-D (n_clients, dim) array, got shape {matrix.shape}")
    n, dim = matrix.shape
    if n < 2:
        raise InputError("secure aggregation needs at least 2 clients (one client's sum is its update)")
    if dim < 1:
        raise InputError("updates must have at least one coordinate")
    bad_rows = [i for i, row in enumerate(matrix) if not np.isfinite(row).all()]  # one row's mask at a time
    if bad_rows:
        raise InputError(f"updates of clients {bad_rows} contain NaN/inf; drop or fix them before aggregating")
    return matrix


def _check_dropouts(dropouts: Mapping[str, Sequence[int]] | None, n: int) -> dict[str, list[int]]:
    if not dropouts:
        return {}
    out: dict[str, list[int]] = {}
    seen: set[int] = set()
    for stage, rows in dropouts.items():
        if stage not in STAGE_NAMES:
            raise ConfigError(f"unknown dropout stage {stage!r}; stages are {', '.join(STAGE_NAMES)}")
        rows = [int(r) for r in rows]
        if any(not 0 <= r < n for r in rows):
            raise ConfigError(f"dropout indices for {stage!r} must be client rows 0..{n - 1}")
        again = seen & set(rows)
        if again:
            raise ConfigError(f"clients {sorted(again)} are listed as dropping at more than one stage")
        seen |= set(rows)
        out[stage] = rows
    return out
