"""The round seam: protocol modes on one side, links (in process, gRPC, Ray) on the other.

A mode (masking, ckks, none) builds one :class:`ServerRound` on the server and one
:class:`ClientRound` per client. Both are sans-IO: bytes in, bytes out, no sockets, clocks
or threads. A :class:`Link` moves those bytes between the server and the parties and owns
deadlines and connections. :func:`drive` is the one loop that joins them -- every backend
runs its rounds through it::

    out = round.start()
    repeat:
        link.deliver(stage, out)                 -- each client its message of the stage
        if round.done: stop
        for reply in link.replies(stage):        -- as they arrive, until stage.awaiting is
            round.receive(client, payload)       --   empty or the link's stage timeout passed
        out = round.close_stage()
    round.outcome()

Rules the driver keeps and every link relies on:

* a client whose message ``receive`` refuses (a typed :mod:`secagg.errors` error) is out of
  the round: the driver calls ``link.drop(client, reason)`` and ignores it from then on;
* a link reports a client it lost (disconnected, timed out, simulated dropout) as a
  :class:`Reply` without payload; the link has already dropped it;
* a client still awaited when ``replies`` ends is dropped by the driver (``link.drop``);
* ``stage.awaiting`` is updated after every reply, so a link can stop early and refuse
  messages the stage does not ask for.

Modes are registered by name (:func:`register_mode`, :func:`get_mode`); the built-in ones
(``masking``: :mod:`secagg.protocol.mode`, ``ckks``: :mod:`secagg.ckks.mode`, ``none``:
:mod:`secagg.plain`) load on first use. Certificate checks are callbacks a link hands in
(:class:`ClientContext.check_certificate`, :class:`RoundContext.read_certificate`), so the
core never imports a transport's PKI.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from secagg.errors import ConfigError, NotEnoughSurvivors, SecAggError
from secagg.keys import IdentityKey

# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class RoundOutcome:
    """What the server releases at the end of one round, whatever mode and link ran it: the
    one outcome type of the code base (:func:`secagg.aggregate`, the engine, every link).

    ``total`` is the decoded float sum over the clients in ``included`` (the only thing the
    server learns). ``dropped``: stage -> clients that stopped answering at that stage;
    ``reasons``: client -> why it was dropped. ``bytes_up_per_param``: mean bytes an
    included client sent over the whole round, per coordinate. ``max_quantization_error``:
    per-coordinate bound on |total - exact sum| from the encoding alone (fixed-point
    rounding for masking, the CKKS noise estimate for ckks). ``protection``: the protection
    that ran ("masking", "ckks", "none"). ``timings`` maps "<side>.<phase>" to seconds;
    ``parameters``: what the round was planned with (threshold, degree, scheme, ...).
    """

    total: np.ndarray
    included: tuple[int, ...]
    dropped: dict[str, tuple[int, ...]] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    bytes_up_per_param: float = 0.0
    max_quantization_error: float = 0.0
    protection: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """Unweighted mean over the included clients."""
        return self.total / max(len(self.included), 1)

    @property
    def protocol(self) -> str:
        """The old name of :attr:`protection`."""
        warnings.warn("RoundOutcome.protocol is now RoundOutcome.protection; `protocol` will be removed",
                      FutureWarning, stacklevel=2)
        return self.protection


# --------------------------------------------------------------------------- the two sides


class ServerRound(Protocol):
    """The server's side of one round (sans-IO)."""

    def start(self) -> dict[int, bytes]: ...
    def awaiting(self) -> frozenset[int]: ...
    def stage(self) -> str: ...
    def receive(self, client_id: int, payload: bytes) -> None: ...
    def close_stage(self) -> dict[int, bytes]: ...
    def max_payload_bytes(self) -> int: ...
    @property
    def done(self) -> bool: ...
    def outcome(self) -> RoundOutcome: ...


class ClientRound(Protocol):
    """One client's side of a round: each server message in, its reply (or None) out."""

    def receive(self, payload: bytes) -> bytes | None: ...
    @property
    def done(self) -> bool: ...


class CertifiedPeer(Protocol):
    """What a checked certificate says about its holder."""

    role: str  # "server" or "client"
    client_id: int | None
    identity_public_key: bytes
    keyholder: bool  # the CA granted the key-holder role


# pem -> what it certifies; raises a typed error for a certificate it must not accept
CertificateCheck = Callable[[bytes], CertifiedPeer]


@dataclass(frozen=True)
class RoundContext:
    """Everything a mode needs to build the server side of one round."""

    round: int
    participants: tuple[int, ...]
    identity_keys: Mapping[int, bytes]  # client id -> raw Ed25519 public key (from certificates)
    threshold: int
    options: Mapping[str, object]
    server_identity: IdentityKey | None = None
    certificates: Mapping[int, bytes] = field(default_factory=dict)  # client id -> PEM (CA-signed)
    server_certificate: bytes = b""  # PEM
    # reads a participant's certificate (already checked by the link, e.g. at the TLS handshake)
    read_certificate: CertificateCheck | None = None


@dataclass(frozen=True)
class ClientContext:
    """Everything a mode needs to build one client's side of a round."""

    round: int
    client_id: int
    identity: IdentityKey
    update: np.ndarray
    # checks a certificate the server relays against the client's own CA (None: it cannot)
    check_certificate: CertificateCheck | None = None
    # masking: the client's own secagg.protocol.plan.ClientPolicy (None: the library default); typed
    # loosely so the seam does not import a mode
    policy: object | None = None
    keyholder: int | None = None  # ckks: the key holder's client id this client trusts (its own config)


@dataclass(frozen=True)
class Mode:
    """A protocol the links can run: build the server round, its params, and client rounds."""

    name: str
    # (ctx) -> (server round, params bytes every participant receives first)
    server: Callable[[RoundContext], tuple[ServerRound, bytes]]
    # (client context, params from the server) -> client round
    client: Callable[[ClientContext, bytes], ClientRound]
    # True: every client payload is a secagg.wire.seal envelope whose sender id is the
    # client id, and a link may check it against the certificate before the driver runs.
    # False: the server round's receive() authenticates the payload as client_id itself.
    sealed_by_sender: bool = True


MODES: dict[str, Mode] = {}
BUILTIN_MODES = {"masking": "secagg.protocol.mode", "ckks": "secagg.ckks.mode", "none": "secagg.plain"}


def register_mode(mode: Mode) -> None:
    MODES[mode.name] = mode


def get_mode(name: str) -> Mode:
    """The registered mode ``name``; the built-in modes load here on first use."""
    if name not in MODES and name in BUILTIN_MODES:
        try:
            importlib.import_module(BUILTIN_MODES[name])
        except ImportError as exc:
            raise ConfigError(f"protocol mode {name!r} needs a package that is not installed: {exc}") from None
    try:
        return MODES[name]
    except KeyError:
        known = sorted(set(MODES) | set(BUILTIN_MODES))
        raise ConfigError(f"unknown protocol mode {name!r}; available: {', '.join(known)}") from None


# --------------------------------------------------------------------------- the link


@dataclass
class StageView:
    """The stage a link is carrying, as the driver keeps it up to date.

    ``awaiting`` (clients whose reply the stage still waits for) is replaced after every
    reply; a link reads it to stop collecting early and to refuse messages nobody asked
    for. ``max_payload_bytes``: the largest message one client may send now.
    """

    name: str
    index: int
    awaiting: frozenset[int]
    max_payload_bytes: int | None = None


@dataclass(frozen=True)
class Reply:
    """One event a link reports: a client's reply, or (``payload`` None) that the link lost it."""

    client: int
    payload: bytes | memoryview | None
    reason: str = ""


class Link(Protocol):
    """Moves one round's bytes between the driver and the parties; owns timeouts and connections."""

    def deliver(self, stage: StageView, outgoing: Mapping[int, bytes]) -> None:
        """Send each client in ``outgoing`` its message (the request of ``stage``)."""

    def replies(self, stage: StageView) -> Iterator[Reply]:
        """Replies as they arrive, until ``stage.awaiting`` is empty or the link's stage timeout."""

    def drop(self, client: int, reason: str) -> None:
        """The driver put ``client`` out of the round: deliver nothing more to it."""


Timer = Callable[[str], AbstractContextManager]


def no_timer(_phase: str) -> AbstractContextManager:
    """The :data:`Timer` that times nothing."""
    return nullcontext()


class PhaseTimes:
    """A :data:`Timer` that adds up seconds per phase (``timer(phase)`` is a context manager).

    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time,
    what a busy machine distorts least. ``also`` is a second PhaseTimes that times the
    same phases (e.g. CPU beside wall).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, *, also: PhaseTimes | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._clock = clock
        self._also = also

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = self._clock()
        try:
            if self._also is None:
                yield
            else:
                with self._also(phase):
                    yield
        finally:
            self.seconds[phase] += self._clock() - started

    def __getitem__(self, phase: str) -> float:
        return self.seconds.get(phase, 0.0)

    def add(self, seconds: Mapping[str, float]) -> None:
        """Count phases timed elsewhere (e.g. by parties in other processes)."""
        for phase, s in seconds.items():
            self.seconds[phase] += s


# --------------------------------------------------------------------------- the driver


def drive(server: ServerRound, link: Link, *, timer: Timer | None = None) -> RoundOutcome:
    """Run ``server`` to its outcome over ``link``: the one round loop of the code base.

    ``timer`` (optional, see :class:`PhaseTimes`) times the server's work on each stage's
    replies as ``"server.receive.<stage>"``. Raises what ``close_stage`` raises (e.g.
    :class:`~secagg.errors.NotEnoughSurvivors`): the round failed and nothing is released.
    """
    timer = timer or no_timer
    gone: dict[int, str] = {}
    dropped: dict[str, list[int]] = {}
    sent: dict[int, int] = defaultdict(int)  # payload bytes each client sent

    def leave(client: int, reason: str, *, tell_link: bool) -> None:
        gone[client] = reason
        if tell_link:
            link.drop(client, reason)

    out = server.start()
    index = 0
    while True:
        view = StageView(server.stage(), index, frozenset(server.awaiting()) - gone.keys(),
                         server.max_payload_bytes())
        link.deliver(view, {c: p for c, p in out.items() if c not in gone})
        if server.done:
            break
        refused: list[int] = []
        for reply in link.replies(view):
            if reply.client in gone:
                pass
            elif reply.payload is None:
                leave(reply.client, reply.reason, tell_link=False)
            elif reply.client in view.awaiting:
                try:
                    with timer(f"server.receive.{view.name}"):
                        server.receive(reply.client, reply.payload)
                except SecAggError as exc:
                    leave(reply.client, f"{type(exc).__name__}: {exc}", tell_link=True)
                    refused.append(reply.client)
                else:
                    sent[reply.client] += memoryview(reply.payload).nbytes
            view.awaiting = frozenset(server.awaiting()) - gone.keys()
            del reply  # a payload may be update-sized: free it before the link fetches the next one
        missing = set(server.awaiting()) | set(refused)
        for client in sorted(set(server.awaiting()) - gone.keys()):
            leave(client, f"no reply in stage {view.name!r}", tell_link=True)
        if missing:  # a stage may run more than once (ckks decrypt batches): add up
            dropped[view.name] = sorted(set(dropped.get(view.name, ())) | missing)
        out = server.close_stage()
        index += 1
    result = server.outcome()
    dim = max(int(np.asarray(result.total).size), 1)
    uploads = [sent[c] for c in result.included]
    return replace(
        result,
        dropped={stage: tuple(ids) for stage, ids in dropped.items()},
        # a client whose input is in the sum was not dropped from the round, whatever happened later
        reasons={c: r for c, r in gone.items() if c not in result.included},
        bytes_up_per_param=float(np.mean(uploads)) / dim if uploads else 0.0,
    )


# --------------------------------------------------------------------------- in process


class Party(Protocol):
    def receive(self, payload: bytes) -> bytes | memoryview | None: ...


class InMemoryLink:
    """The parties live in this process: each answers its stage message at once.

    ``vanish`` maps a stage name to clients that disappear when that stage's message
    reaches them (simulated dropouts). A party raising
    :class:`~secagg.errors.NotEnoughSurvivors` stops, like a dropout. ``timer`` times each
    party's work as ``"client.<stage>"`` (summed over parties; :attr:`answered` counts them).
    """

    def __init__(self, parties: Mapping[int, Party], *, vanish: Mapping[str, object] | None = None,
                 timer: Timer | None = None) -> None:
        self.parties = parties
        self.vanish = {stage: set(ids) for stage, ids in (vanish or {}).items()}  # type: ignore[call-overload]
        self.timer = timer or no_timer
        self.gone: set[int] = set()
        self.answered: dict[str, int] = defaultdict(int)
        self._inbox: dict[int, bytes] = {}

    def deliver(self, stage: StageView, outgoing: Mapping[int, bytes]) -> None:
        self._inbox = {c: p for c, p in outgoing.items() if c not in self.gone}

    def replies(self, stage: StageView) -> Iterator[Reply]:
        inbox, self._inbox = self._inbox, {}
        for client, message in inbox.items():
            party = self.parties.get(client)
            if party is None or client in self.gone:
                continue  # never joined this round: it does not answer
            if client in self.vanish.get(stage.name, ()):
                self.gone.add(client)
                yield Reply(client, None, f"dropped out at stage {stage.name!r} (simulated)")
                continue
            try:
                with self.timer(f"client.{stage.name}"):
                    reply = party.receive(message)
            except NotEnoughSurvivors as exc:  # too few live neighbours: this client stops
                self.gone.add(client)
                yield Reply(client, None, f"stopped: {exc}")
                continue
            self.answered[stage.name] += 1
            if reply is not None:
                yield Reply(client, reply)
            del reply  # free an update-sized reply before the next party builds its own

    def drop(self, client: int, reason: str) -> None:
        self.gone.add(client)
