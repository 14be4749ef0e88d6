"""The CKKS protection mode (``secagg.ckks``) as a transport mode.

Roles over the network. The server never holds a key. One participating client, the
*key holder* (``keyholder`` option, a client id), generates the round's keys, decrypts the
single aggregate and returns the plaintext sum; it also contributes its own update like
every other client. Stages:

1. ``context``  -- the key holder receives a context request and replies with the
                   public context (for clients) and the parameters-only context (for the
                   server), each sealed with its certificate-bound Ed25519 key;
2. ``upload``   -- every participant receives the public context, checks the key
                   holder's signature (its certificate is relayed and checked against the
                   CA), encrypts its clipped update and uploads it; the server adds;
3. ``decrypt``  -- the key holder receives the sum (sealed by the server's
                   certificate-bound key), decrypts it once and returns the plaintext.

A client that does not upload by the end of ``upload`` is left out of the sum; if the key
holder drops, the round fails (nothing is released). Client ``participants[i]`` is
party ``i`` of :class:`secagg.ckks.RoundConfig`; the server maps indices back to client
ids and checks that every upload arrived on the stream of the client it names.

Options: ``dim`` (required), ``clip`` (per-coordinate bound every client enforces,
required), ``keyholder`` (client id; default the lowest participant), ``scheme``
("ckks" or "bfv").
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from federation.transport.certs import verify_certificate
from federation.transport.rounds import (
    ClientContext,
    Mode,
    RoundContext,
    RoundOutcome,
    register_mode,
)
from secagg import wire
from secagg.ckks import HeClient, HeParams, HeServer, KeyHolder, RoundConfig, new_round_id
from secagg.errors import (
    ConfigError,
    InvalidSignature,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
)


@wire.message
class CkksDirectory(wire.Message):
    """Round parameters every participant needs to rebuild the same RoundConfig."""

    TYPE = "transport.ckks.directory"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"round_id": 64, "server_certificate": 8192, "keyholder_certificate": 8192}
    round: int
    round_id: bytes
    dim: int
    scheme: str
    value_bound: float
    min_clients: int
    participants: tuple[int, ...]
    keyholder: int
    server_certificate: bytes
    keyholder_certificate: bytes


@wire.message
class CkksContextRequest(wire.Message):
    TYPE = "transport.ckks.context_request"
    round: int


@wire.message
class CkksContexts(wire.Message):
    """Key holder -> server (sealed by the key holder's client id): both sealed contexts."""

    TYPE = "transport.ckks.contexts"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"for_clients": 64 << 20, "for_server": 64 << 20}
    round: int
    for_clients: bytes
    for_server: bytes


@wire.message
class CkksRelease(wire.Message):
    """Key holder -> server (sealed): the decrypted sum and the parties it covers."""

    TYPE = "transport.ckks.release"
    round: int
    values: bytes  # little-endian float64
    included: tuple[int, ...]  # party indices


def _params(scheme: str) -> HeParams:
    if scheme == "ckks":
        return HeParams.ckks()
    if scheme == "bfv":
        return HeParams.bfv()
    raise ConfigError(f"scheme must be 'ckks' or 'bfv', got {scheme!r}")


def _round_config(d: CkksDirectory) -> RoundConfig:
    return RoundConfig(d.round_id, d.dim, len(d.participants), _params(d.scheme), d.value_bound, False, d.min_clients)


class CkksServerRound:
    def __init__(self, ctx: RoundContext, directory: CkksDirectory) -> None:
        self.ctx, self.d = ctx, directory
        self.config = _round_config(directory)
        self.index = {cid: i for i, cid in enumerate(directory.participants)}
        self.keyholder_key = ctx.identity_keys[directory.keyholder]
        self._stage = "context"
        self._contexts: CkksContexts | None = None
        self._server: HeServer | None = None
        self._uploaded: set[int] = set()
        self._release: CkksRelease | None = None
        self._done = False

    def start(self) -> dict[int, bytes]:
        return {self.d.keyholder: wire.encode(CkksContextRequest(round=self.ctx.round))}

    def stage(self) -> str:
        return self._stage

    def awaiting(self) -> frozenset[int]:
        if self._stage == "context":
            return frozenset() if self._contexts else frozenset({self.d.keyholder})
        if self._stage == "upload":
            return frozenset(self.d.participants) - self._uploaded
        if self._stage == "decrypt":
            return frozenset() if self._release else frozenset({self.d.keyholder})
        return frozenset()

    def _from_keyholder(self, client_id: int, payload: bytes, expect):
        if client_id != self.d.keyholder:
            raise RemoteProtocolError(f"client {client_id} is not this round's key holder", client_id)
        _, msg = wire.open_sealed(payload, {self.d.keyholder: self.keyholder_key}.get, expect=expect)
        if msg.round != self.ctx.round:
            raise ReplayError(f"key holder message of round {msg.round} in round {self.ctx.round}")
        return msg

    def receive(self, client_id: int, payload: bytes) -> None:
        if self._stage == "context" and self._contexts is None:
            self._contexts = self._from_keyholder(client_id, payload, CkksContexts)
        elif self._stage == "upload" and self._server is not None:
            party = self._server.receive(payload)
            if self.d.participants[party] != client_id:
                raise RemoteProtocolError(
                    f"upload of party {party} (client {self.d.participants[party]}) arrived on client {client_id}'s stream",
                    client_id,
                )
            self._uploaded.add(client_id)
        elif self._stage == "decrypt" and self._release is None:
            self._release = self._from_keyholder(client_id, payload, CkksRelease)
        else:
            raise ReplayError(f"client {client_id} sent a message stage {self._stage!r} did not ask for")

    def close_stage(self) -> dict[int, bytes]:
        if self._stage == "context":
            if self._contexts is None:
                raise NotEnoughSurvivors("the key holder did not send the round's keys; nothing can be aggregated")
            self._server = HeServer(
                self.config, self._contexts.for_server, self.keyholder_key,
                {i: self.ctx.identity_keys[c] for i, c in enumerate(self.d.participants)},
                identity=self.ctx.server_identity,
            )
            self._stage = "upload"
            return {c: self._contexts.for_clients for c in self.d.participants}
        if self._stage == "upload":
            aggregate = self._server.aggregate()  # raises NotEnoughSurvivors below min_clients
            self._stage = "decrypt"
            return {self.d.keyholder: aggregate}
        if self._stage == "decrypt":
            if self._release is None:
                raise NotEnoughSurvivors("the key holder did not return the decrypted sum")
            self._stage, self._done = "done", True
            return {}
        raise ReplayError("round already finished")

    @property
    def done(self) -> bool:
        return self._done

    def outcome(self) -> RoundOutcome:
        r = self._release
        total = np.frombuffer(r.values, dtype="<f8").copy()
        included = tuple(sorted(self.d.participants[i] for i in r.included))
        return RoundOutcome(total=total, included=included)


class CkksClientRound:
    def __init__(self, ctx: ClientContext, params: bytes) -> None:
        d = wire.decode(params, expect=CkksDirectory)
        if d.round != ctx.round:
            raise ReplayError(f"directory of round {d.round} sent in round {ctx.round}")
        if ctx.client_id not in d.participants:
            raise ConfigError("this client is not a participant of the round")
        server = verify_certificate(d.server_certificate, ctx.ca_pem)
        holder = verify_certificate(d.keyholder_certificate, ctx.ca_pem)
        if server.role != "server" or holder.role != "client" or holder.client_id != d.keyholder:
            raise InvalidSignature("the relayed server or key-holder certificate is not what it claims")
        self.ctx, self.d = ctx, d
        self.config = _round_config(d)
        self.server_key = server.identity_public_key
        self.holder_key = holder.identity_public_key
        self.is_holder = ctx.client_id == d.keyholder
        bound = d.value_bound
        self.update = np.clip(np.asarray(ctx.update, dtype=np.float64).ravel(), -bound, bound)
        if self.update.size != d.dim:
            raise ConfigError(f"this client's update has {self.update.size} values, the round expects {d.dim}")
        self.holder: KeyHolder | None = None
        self.step = 0
        self._done = False

    def receive(self, payload: bytes) -> bytes | None:
        me, ident = self.ctx.client_id, self.ctx.identity
        self.step += 1
        if self.is_holder and self.step == 1:
            wire.decode(payload, expect=CkksContextRequest)
            self.holder = KeyHolder(self.config, identity=ident)
            reply = CkksContexts(self.ctx.round, self.holder.context_for_clients(), self.holder.context_for_server())
            return wire.seal(reply, me, ident)
        if self.step == (2 if self.is_holder else 1):
            client = HeClient(self.d.participants.index(me), self.config, payload, self.holder_key, identity=ident)
            if not self.is_holder:
                self._done = True
            return client.encrypt(self.update)
        if self.is_holder and self.step == 3:
            result = self.holder.decrypt(payload, self.server_key)
            self._done = True
            reply = CkksRelease(self.ctx.round, result.values.astype("<f8").tobytes(), tuple(result.included))
            return wire.seal(reply, me, ident)
        raise ReplayError("the server sent a message this client did not expect")

    @property
    def done(self) -> bool:
        return self._done


def _server(ctx: RoundContext):
    o = ctx.options
    dim = int(o.get("dim", 0))
    if dim <= 0:
        raise ConfigError("the ckks mode needs a positive `dim` option")
    if "clip" not in o:
        raise ConfigError("the ckks mode needs `clip`, the per-coordinate bound every client enforces")
    keyholder = int(o.get("keyholder", min(ctx.participants)))
    if keyholder not in ctx.participants:
        raise NotEnoughSurvivors(f"the key holder (client {keyholder}) is not connected; the round cannot run")
    directory = CkksDirectory(
        round=ctx.round, round_id=new_round_id(), dim=dim, scheme=str(o.get("scheme", "ckks")),
        value_bound=float(o["clip"]), min_clients=max(2, int(ctx.threshold)),
        participants=tuple(ctx.participants), keyholder=keyholder,
        server_certificate=ctx.server_certificate, keyholder_certificate=ctx.certificates[keyholder],
    )
    return CkksServerRound(ctx, directory), wire.encode(directory)


register_mode(Mode("ckks", _server, CkksClientRound, sealed_by_sender=False))
