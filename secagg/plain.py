"""The ``none`` mode (no protection): the insecure baseline (the server sees every update).

Clients upload float32 vectors in the clear, signed; the server sums them. It exists to
measure what a link costs on its own, next to the secure modes (load benchmarks,
transport tests); clients refuse it unless their configuration lists it.
"""

from __future__ import annotations

import logging

import numpy as np

from secagg import wire
from secagg.errors import (
    ConfigError,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
    WireError,
)
from secagg.rounds import (
    ClientContext,
    Mode,
    RoundContext,
    RoundOutcome,
    ServerRound,
    register_mode,
)

log = logging.getLogger("secagg.client")


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
    """One upload stage: take each participant's signed float32 vector, sum them."""

    def __init__(self, ctx: RoundContext, dim: int) -> None:
        self._ctx, self._dim = ctx, dim
        self._received: dict[int, np.ndarray] = {}
        self._done = False
        self._stage = "upload"

    def start(self) -> dict[int, bytes]:
        return {cid: b"" for cid in self._ctx.participants}  # the round's params carry all a client needs

    def awaiting(self) -> frozenset[int]:
        if self._done:
            return frozenset()
        return frozenset(set(self._ctx.participants) - set(self._received))

    def stage(self) -> str:
        return self._stage

    def max_payload_bytes(self) -> int:
        return 4 * self._dim + (4 << 10)  # the vector and its seal

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
        return RoundOutcome(total=total, included=ids, protection="none")


class PlainClientRound:
    def __init__(self, ctx: ClientContext, params: bytes) -> None:
        log.warning("client %d: round %d is in mode 'none' (no protection) -- the server will see this update in the clear",
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
        raise ConfigError("mode 'none' needs a positive `dim` option")
    return PlainServerRound(ctx, dim), wire.encode(PlainConfig(round=ctx.round, dim=dim))


register_mode(Mode("none", _plain_server, PlainClientRound))
