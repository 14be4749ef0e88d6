"""Simulated clients hosted in batches, and the link to batches in worker processes.

A :class:`ClientPool` hosts the sans-IO sessions of a batch of masking clients and
answers a stage's messages for all of them in one call: it is what one Ray actor runs
(:mod:`federation.transport.ray_backend`) and what one worker process of a
process-parallel simulated round runs (:class:`ProcessLink`). A party's identity key is
made inside its pool and never leaves it.

The in-process simulation runs every client in one Python process, and ``cryptography``'s
X25519 holds the GIL, so threads cannot share the clients' key agreements (two per
ordered neighbour pair, the bulk of a round at d = 10^4). :class:`ProcessLink` spreads the
clients over worker processes (``multiprocessing``, "spawn" context), one pool each; the
server stays in the calling process, behind the one round loop :func:`secagg.rounds.drive`.
Parent and workers exchange only the protocol's sealed wire bytes and plain values in a
msgpack frame (never a pickle): stage by stage each worker gets its clients' messages in
one frame and sends the replies back in a few frames as it goes, so the server checks the
first replies while the workers compute the rest. With the same rounding seeds the
released sum is bit-identical to the one-process round (the masks cancel exactly; the
order in which the server adds uploads does not change a sum mod 2^bits).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Self

import msgpack
import numpy as np

from secagg import errors
from secagg.errors import ConfigError, NotEnoughSurvivors, SecAggError
from secagg.keys import IdentityKey, derive
from secagg.protocol.client import ClientSession
from secagg.rounds import Reply, StageView


def rounding_seed(seed: int, client: int) -> bytes:
    """Client ``client``'s stochastic-rounding seed from a simulation's public ``seed`` (tests and
    benchmarks only): every link that simulates clients derives it here, so their sums agree."""
    return derive(seed.to_bytes(16, "big", signed=True), label=b"secagg/v1/test-rounding", context=client.to_bytes(8, "big"))


def check_processes(processes: int) -> None:
    """Refuse a worker-process count that is not a whole number >= 1 (``True`` included)."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"processes must be a whole number >= 1, got {processes!r}")


class ClientPool:
    """The sessions of a batch of simulated parties, answering a stage for all of them at once.

    ``stops``: the errors after which a party stops and is reported as gone (its reason
    kept) instead of the error propagating; the in-process links stop a client only for
    :class:`~secagg.errors.NotEnoughSurvivors` (anything else is the caller's to see), the
    Ray actors for every typed error.
    """

    def __init__(self, client_ids: Sequence[int], *, seed: int | None = None,
                 stops: tuple[type[BaseException], ...] = (NotEnoughSurvivors,)) -> None:
        self._ids = tuple(int(c) for c in client_ids)
        self.seed = seed
        self.stops = stops
        self.identities = {c: IdentityKey.generate() for c in self._ids}
        self.sessions: dict = {}
        self.drop: dict[str, set[int]] = {}

    def client_ids(self) -> tuple[int, ...]:
        return self._ids

    def public_keys(self) -> dict[int, bytes]:
        return {c: k.public_bytes for c, k in self.identities.items()}

    def begin(self, directory: Mapping[int, bytes], updates: Mapping[int, np.ndarray],
              drop: Mapping[str, Sequence[int]], *, workers: int = 1) -> int:
        """New masking round: a session for each hosted client in ``directory`` (id -> identity
        key) with an update; ``drop`` maps a stage to the clients that vanish there. Returns the
        number of sessions."""
        self.sessions = {}
        self.drop = {s: set(ids) & set(self._ids) for s, ids in drop.items()}
        for c in self._ids:
            if c not in directory or c not in updates:  # a pool may host more clients than this round uses
                continue
            self.sessions[c] = ClientSession(
                c, self.identities[c], directory, update=updates[c],
                rounding_seed=None if self.seed is None else rounding_seed(self.seed, c), workers=workers,
            )
        return len(self.sessions)

    def step(self, stage: str, inbox: Mapping[int, bytes]) -> tuple[dict[int, bytes], dict[int, str], float]:
        """Hand each hosted party its message; return replies, parties that stopped (with the
        reason: a simulated dropout or one of ``stops``) and the CPU seconds it took."""
        started = time.process_time()
        out: dict[int, bytes] = {}
        failed: dict[int, str] = {}
        for c, data in inbox.items():
            if c in self.drop.get(stage, ()):
                self.sessions.pop(c, None)  # simulated dropout: the client vanishes here
                failed[c] = f"dropped out at stage {stage!r} (simulated)"
                continue
            session = self.sessions.get(c)
            if session is None:
                continue  # never joined this round: it does not answer
            try:
                reply = session.receive(data)
            except self.stops as exc:
                failed[c] = f"{type(exc).__name__}: {exc}"
                self.sessions.pop(c, None)
                continue
            if reply is not None:
                out[c] = reply
        return out, failed, time.process_time() - started


# --------------------------------------------------------------------------- worker processes

#: a worker answers a stage in this many frames, so the server starts on the first replies early
CHUNKS_PER_WORKER = 4


def _send(conn: Connection, message: dict) -> None:
    conn.send_bytes(msgpack.packb(message, use_bin_type=True))


def _receive(conn: Connection) -> dict:
    try:
        return msgpack.unpackb(conn.recv_bytes(), raw=False, strict_map_key=False)
    except EOFError:
        raise errors.ConnectionLost("a client worker process exited in the middle of the round") from None


def _worker(conn: Connection, client_ids: list[int], seed: int | None) -> None:
    """A worker process's body: host one :class:`ClientPool` and answer the parent's requests."""
    pool = ClientPool(client_ids, seed=seed)
    _send(conn, {"keys": pool.public_keys()})
    while True:
        try:
            request = _receive(conn)
        except errors.ConnectionLost:
            return  # the parent went away: nothing is left to answer
        try:
            if request["op"] == "close":
                return
            if request["op"] == "begin":
                dtype = np.dtype(request["dtype"])
                updates = {c: np.frombuffer(row, dtype=dtype) for c, row in request["updates"].items()}
                count = pool.begin(request["directory"], updates, request["drop"], workers=request["workers"])
                _send(conn, {"sessions": count})
                continue
            items = list(request["inbox"].items())
            size = max(1, math.ceil(len(items) / CHUNKS_PER_WORKER))
            for start in range(0, max(len(items), 1), size):
                replies, stopped, seconds = pool.step(request["stage"], dict(items[start:start + size]))
                _send(conn, {"replies": replies, "stopped": stopped, "seconds": seconds,
                             "last": start + size >= len(items)})
        except Exception as exc:  # noqa: BLE001 -- the parent raises it: a worker must not die silently
            _send(conn, {"error": type(exc).__name__, "message": str(exc)})


def _raise_worker_error(reply: dict) -> None:
    """Raise, in the parent, the error a worker reported: the same typed error for a secagg one."""
    cls = getattr(errors, reply["error"], None)
    if isinstance(cls, type) and issubclass(cls, SecAggError):
        raise cls(reply["message"])
    raise RuntimeError(f"a client worker process failed: {reply['error']}: {reply['message']}")


class ProcessLink:
    """:class:`secagg.rounds.Link` to simulated clients spread over ``processes`` worker processes.

    The parties answer exactly as over :class:`~secagg.rounds.InMemoryLink`: a client in
    ``vanish[stage]`` disappears when that stage's message reaches it, one raising
    :class:`~secagg.errors.NotEnoughSurvivors` stops, any other error is raised here.
    ``cpu_seconds`` (per stage: the workers' CPU time) and ``answered`` (parties that
    answered, per stage) time the clients. Start with :meth:`start`, end with :meth:`close`
    (or use it as a context manager).
    """

    def __init__(self, client_ids: Sequence[int], *, processes: int = 2, seed: int | None = None) -> None:
        check_processes(processes)
        self._batches = [[int(c) for c in b] for b in np.array_split(np.asarray(client_ids), processes) if len(b)]
        self._seed = seed
        self._conns: list[Connection] = []
        self._procs: list = []
        self.owners: dict[int, Connection] = {}
        self.gone: set[int] = set()
        self.cpu_seconds: dict[str, float] = {}
        self.answered: dict[str, int] = {}
        self._pending: set[Connection] = set()

    def start(self) -> dict[int, bytes]:
        """Start the workers; return every hosted client's identity key (made in its worker)."""
        context = multiprocessing.get_context("spawn")
        try:
            for batch in self._batches:
                parent, child = context.Pipe()
                process = context.Process(target=_worker, args=(child, batch, self._seed), daemon=True,
                                          name=f"secagg-clients-{batch[0]}-{batch[-1]}")
                process.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(process)
            keys: dict[int, bytes] = {}
            for conn in self._conns:
                hosted = _receive(conn)["keys"]
                keys.update(hosted)
                self.owners.update({c: conn for c in hosted})
        except BaseException:
            self.close()
            raise
        return keys

    def begin(self, directory: Mapping[int, bytes], updates: np.ndarray,
              drop: Mapping[str, Sequence[int]], *, workers: int = 1) -> None:
        """A session for every client ``c`` with update row ``updates[c - 1]`` (sent as its raw bytes)."""
        matrix = np.asarray(updates)
        for conn in self._conns:
            hosted = [c for c, owner in self.owners.items() if owner is conn]
            _send(conn, {"op": "begin", "directory": dict(directory), "dtype": matrix.dtype.str,
                         "updates": {c: matrix[c - 1].tobytes() for c in hosted},
                         "drop": {s: [int(c) for c in ids] for s, ids in drop.items()}, "workers": workers})
        for conn in self._conns:
            reply = _receive(conn)
            if "error" in reply:
                _raise_worker_error(reply)

    def deliver(self, stage: StageView, outgoing: Mapping[int, bytes]) -> None:
        by_worker: dict[Connection, dict[int, bytes]] = {}
        for c, payload in outgoing.items():
            if c not in self.gone and c in self.owners:
                by_worker.setdefault(self.owners[c], {})[c] = bytes(payload)
        for conn, inbox in by_worker.items():  # every worker waits for a request: the sends complete
            _send(conn, {"op": "step", "stage": stage.name, "inbox": inbox})
        self._pending = set(by_worker)

    def replies(self, stage: StageView) -> Iterator[Reply]:
        while self._pending:
            for conn in wait(list(self._pending)):
                reply = _receive(conn)
                if "error" in reply:
                    self._pending.discard(conn)
                    _raise_worker_error(reply)
                self.cpu_seconds[stage.name] = self.cpu_seconds.get(stage.name, 0.0) + reply["seconds"]
                self.answered[stage.name] = self.answered.get(stage.name, 0) + len(reply["replies"])
                if reply["last"]:
                    self._pending.discard(conn)
                for c, reason in reply["stopped"].items():
                    self.gone.add(c)
                    yield Reply(c, None, reason)
                for c, payload in reply["replies"].items():
                    yield Reply(c, payload)
                del reply  # replies may be update-sized: free them before the next frame arrives

    def drop(self, client: int, reason: str) -> None:
        self.gone.add(client)  # its worker session stays idle: nothing more is delivered to it

    def close(self) -> None:
        """Stop the workers (each ends its loop; one that does not within 10 s is terminated)."""
        for conn in self._conns:
            try:
                _send(conn, {"op": "close"})
            except OSError:
                pass  # already gone
        for process in self._procs:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self._pending = [], [], set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
