"""Round drivers: the seam between a transport (gRPC, Ray, in-process) and a protocol.

A transport knows nothing about masking or CKKS. For each round it builds one
:class:`ServerRound` on the server and one :class:`ClientRound` per client (from the
mode named in :class:`~federation.transport.frames.RoundStart`) and only moves their
bytes:

    server                                          client
    ------                                          ------
    out = round.start()            -- bytes -->     reply = round.receive(payload)
    round.receive(cid, reply)      <-- bytes --
    ...until every client in round.awaiting() answered, or the stage timed out...
    out = round.close_stage()      -- bytes -->     ...
    ...until round.done; then round.outcome()

Rules every driver follows (the transport relies on them):

* no I/O, no clocks, no threads -- the transport owns timeouts; a client that did not
  answer by the end of a stage is simply absent when ``close_stage()`` runs;
* ``receive`` raises a typed :mod:`secagg.errors` error for anything a client must be
  dropped for (bad signature, replay, wrong round, malformed); the transport logs the
  error as the reason and stops routing that client's messages to this round;
* payloads are sealed (:func:`secagg.wire.seal`) by the sender's Ed25519 identity; the
  transport has already checked that the seal's sender is the client the certificate names.

Modes are registered by name in :data:`MODES`; ``plain`` below is the insecure baseline
(the server sees every update) used by load benchmarks and transport tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from secagg import wire
from secagg.errors import (
    ConfigError,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
    WireError,
)
from secagg.keys import IdentityKey
from secagg.protocol.plan import ClientPolicy


@dataclass(frozen=True)
class RoundOutcome:
    """What the server releases at the end of a round."""

    total: np.ndarray
    included: tuple[int, ...]
    dropped: dict[int, str] = field(default_factory=dict)


class ServerRound(Protocol):
    def start(self) -> dict[int, bytes]: ...
    def awaiting(self) -> frozenset[int]: ...
    def stage(self) -> str: ...
    def receive(self, client_id: int, payload: bytes) -> None: ...
    def close_stage(self) -> dict[int, bytes]: ...
    @property
    def done(self) -> bool: ...
    def outcome(self) -> RoundOutcome: ...


class ClientRound(Protocol):
    def receive(self, payload: bytes) -> bytes | None: ...
    @property
    def done(self) -> bool: ...


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


@dataclass(frozen=True)
class ClientContext:
    """Everything a mode needs to build one client's side of a round."""

    round: int
    client_id: int
    identity: IdentityKey
    update: np.ndarray
    ca_pem: bytes = b""  # to verify the peer certificates a server relays
    policy: ClientPolicy | None = None  # the client's own masking policy (None: the library default)
    keyholder: int | None = None  # ckks: the key holder's client id this client trusts (its own config)


@dataclass(frozen=True)
class Mode:
    """A protocol the transports can run: build the server round, its params, and client rounds."""

    name: str
    # (ctx) -> (server round, params bytes for RoundStart)
    server: Callable[[RoundContext], tuple[ServerRound, bytes]]
    # (client context, params from the server) -> client round
    client: Callable[[ClientContext, bytes], ClientRound]
    # True: every client payload is a secagg.wire.seal envelope whose sender id is the
    # client id, and the transport checks it against the certificate before the driver
    # runs. False: the driver's receive() authenticates the payload as client_id itself.
    sealed_by_sender: bool = True


MODES: dict[str, Mode] = {}
log = logging.getLogger("secagg.client")


def register_mode(mode: Mode) -> None:
    MODES[mode.name] = mode


def get_mode(name: str) -> Mode:
    if name not in MODES:
        _load_builtin_modes()
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"unknown protocol mode {name!r}; available: {', '.join(sorted(MODES))}") from None


def _load_builtin_modes() -> None:
    # Modes whose protocol packages are optional or still landing register on import.
    import importlib

    for module in ("federation.transport.masking_mode", "federation.transport.ckks_mode"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


# --------------------------------------------------------------------------- plain (baseline)


@wire.message
class PlainConfig(wire.Message):
    TYPE = "transport.plain.config"
    round: int
    dim: int


@wire.message
class PlainUpdate(wire.Message):
    TYPE = "transport.plain.update"
    round: int
    vector: bytes  # little-endian float32


class PlainServerRound:
    """Insecure baseline: clients upload float32 vectors in the clear (signed); the server sums.

    The server sees every individual update. Use it only to measure what the transport
    costs on its own, next to the secure modes.
    """

    def __init__(self, ctx: RoundContext, dim: int) -> None:
        self._ctx, self._dim = ctx, dim
        self._received: dict[int, np.ndarray] = {}
        self._dropped: dict[int, str] = {}
        self._done = False
        self._stage = "upload"

    def start(self) -> dict[int, bytes]:
        return {cid: b"" for cid in self._ctx.participants}  # RoundStart carries all a client needs

    def awaiting(self) -> frozenset[int]:
        if self._done:
            return frozenset()
        return frozenset(set(self._ctx.participants) - set(self._received) - set(self._dropped))

    def stage(self) -> str:
        return self._stage

    def receive(self, client_id: int, payload: bytes) -> None:
        keys = self._ctx.identity_keys
        sender, msg = wire.open_sealed(payload, lambda sid: keys.get(sid), expect=PlainUpdate)
        if sender != client_id:
            raise RemoteProtocolError(f"payload sealed by {sender} arrived on client {client_id}'s stream", client_id)
        if msg.round != self._ctx.round:
            raise ReplayError(f"update for round {msg.round} replayed in round {self._ctx.round}")
        if client_id in self._received:
            raise ReplayError(f"client {client_id} sent a second update in round {self._ctx.round}")
        if client_id not in self._ctx.participants:
            raise RemoteProtocolError(f"client {client_id} is not a participant of this round", client_id)
        if len(msg.vector) != 4 * self._dim:
            raise WireError(f"update has {len(msg.vector) // 4} values, expected {self._dim}")
        vec = np.frombuffer(msg.vector, dtype="<f4")
        if not np.all(np.isfinite(vec)):
            raise WireError("update contains NaN or infinity")
        self._received[client_id] = vec

    def close_stage(self) -> dict[int, bytes]:
        if len(self._received) < self._ctx.threshold:
            raise NotEnoughSurvivors(
                f"only {len(self._received)} updates arrived, the threshold is {self._ctx.threshold}"
            )
        self._done = True
        self._stage = "done"
        return {}

    @property
    def done(self) -> bool:
        return self._done

    def outcome(self) -> RoundOutcome:
        ids = tuple(sorted(self._received))
        total = np.zeros(self._dim, dtype=np.float64)
        for cid in ids:
            total += self._received[cid]
        return RoundOutcome(total=total, included=ids)


class PlainClientRound:
    def __init__(self, ctx: ClientContext, params: bytes) -> None:
        log.warning("client %d: round %d is in mode 'plain' -- the server will see this update in the clear",
                    ctx.client_id, ctx.round)
        cfg = wire.decode(params, expect=PlainConfig)
        if cfg.round != ctx.round:
            raise ReplayError(f"round parameters for round {cfg.round} in round {ctx.round}")
        x = np.asarray(ctx.update, dtype="<f4").ravel()
        if x.size != cfg.dim:
            raise ConfigError(f"this client's update has {x.size} values, the server expects {cfg.dim}")
        self._reply = wire.seal(PlainUpdate(round=ctx.round, vector=x.tobytes()), ctx.client_id, ctx.identity)
        self._done = False

    def receive(self, payload: bytes) -> bytes | None:
        if self._done:
            raise ReplayError("plain round already answered")
        self._done = True
        return self._reply

    @property
    def done(self) -> bool:
        return self._done


def _plain_server(ctx: RoundContext) -> tuple[ServerRound, bytes]:
    dim = int(ctx.options.get("dim", 0))
    if dim <= 0:
        raise ConfigError("the plain mode needs a positive `dim` option")
    return PlainServerRound(ctx, dim), wire.encode(PlainConfig(round=ctx.round, dim=dim))


register_mode(Mode("plain", _plain_server, PlainClientRound))
