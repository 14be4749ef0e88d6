"""The CKKS protection mode (``secagg.ckks``) as a transport mode.

Roles over the network. The server never holds a key. One participating client, the
*key holder*, generates the round's keys, decrypts the single aggregate and returns the
plaintext sum; it also contributes its own update like every other client. The key holder
is chosen by the clients, never by the server: each client names the key holder it trusts
in its own configuration (``keyholder`` in ``[client]``), and that client's certificate
must carry the CA's key-holder role (``secagg certs issue ID --role keyholder``). A round
whose directory names any other key holder is refused by every client, the named one
included, so the server cannot promote a client. Stages:

1. ``context``  -- the key holder receives a context request and replies with the
                   public context (for clients) and the parameters-only context (for the
                   server), each sealed with its certificate-bound Ed25519 key;
2. ``upload``   -- every participant receives the public context, checks that the key
                   holder it trusts signed it (certificates relayed and checked against the
                   CA), encrypts its clipped update and uploads it; the server adds;
3. ``decrypt``  -- the key holder receives the sum (sealed by the server's
                   certificate-bound key) *and every upload in it*; it checks each upload's
                   signature against the relayed certificates, recomputes the sum itself,
                   refuses anything else, decrypts once and returns the plaintext.

A client that does not upload by the end of ``upload`` is left out of the sum; if the key
holder drops, the round fails (nothing is released). Client ``participants[i]`` is
party ``i`` of :class:`secagg.ckks.RoundConfig`; the server maps indices back to client
ids and checks that every upload arrived on the stream of the client it names.

Options: ``dim`` (required), ``clip`` (per-coordinate bound every client enforces,
required), ``scheme`` ("ckks" or "bfv"), ``keyholder`` (client id; default: the one
participant whose certificate carries the key-holder role -- clients refuse any other).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from federation.transport.certs import identity_from_pem, verify_certificate
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
    MaliciousServerDetected,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
)

MAX_CONTEXTS_BYTES = 16 << 20  # both sealed contexts (a public context is under 1 MiB)


@wire.message
class CkksDirectory(wire.Message):
    """Round parameters every participant needs to rebuild the same RoundConfig, and the
    CA-signed certificates of the server and of every participant (the key holder checks
    each upload's signature against them)."""

    TYPE = "transport.ckks.directory.v2"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"round_id": 64, "server_certificate": 8192, "certificates": 8192}
    round: int
    round_id: bytes
    dim: int
    scheme: str
    value_bound: float
    min_clients: int
    participants: tuple[int, ...]
    keyholder: int
    server_certificate: bytes
    certificates: dict[int, bytes]


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
class CkksDecryptRequest(wire.Message):
    """Server -> key holder: the sealed aggregate and every signed upload it claims to add."""

    TYPE = "transport.ckks.decrypt_request"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"aggregate": wire.DEFAULT_MAX_BYTES, "uploads": wire.DEFAULT_MAX_BYTES}
    round: int
    aggregate: bytes
    uploads: tuple[bytes, ...]


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

    def max_payload_bytes(self) -> int:
        """Largest message one client may send at the current stage (refused at its first chunk)."""
        if self._stage == "context":
            return MAX_CONTEXTS_BYTES
        if self._stage == "upload":
            return self.config.max_message_bytes
        return 8 * self.config.dim + (64 << 10)  # the released float64 sum

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
            request = CkksDecryptRequest(self.ctx.round, aggregate, self._server.uploads)
            return {self.d.keyholder: wire.encode(request)}
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
        self.holder_key = self._check_keyholder(ctx, d)
        server = verify_certificate(d.server_certificate, ctx.ca_pem)
        if server.role != "server":
            raise InvalidSignature("the relayed server certificate is not a server certificate")
        if set(d.certificates) != set(d.participants):
            raise InvalidSignature("the directory must relay the certificate of every participant, and only theirs")
        self.client_keys: dict[int, bytes] = {}
        for index, cid in enumerate(d.participants):
            peer = verify_certificate(d.certificates[cid], ctx.ca_pem)
            if peer.role != "client" or peer.client_id != cid:
                raise InvalidSignature(f"the certificate relayed for client {cid} names someone else")
            self.client_keys[index] = peer.identity_public_key
        if self.client_keys[d.participants.index(ctx.client_id)] != ctx.identity.public_bytes:
            raise InvalidSignature("the directory does not hold this client's own certificate")
        self.ctx, self.d = ctx, d
        self.config = _round_config(d)
        self.server_key = server.identity_public_key
        self.is_holder = ctx.client_id == d.keyholder
        bound = d.value_bound
        self.update = np.clip(np.asarray(ctx.update, dtype=np.float64).ravel(), -bound, bound)
        if self.update.size != d.dim:
            raise ConfigError(f"this client's update has {self.update.size} values, the round expects {d.dim}")
        self.holder: KeyHolder | None = None
        self.step = 0
        self._done = False

    @staticmethod
    def _check_keyholder(ctx: ClientContext, d: CkksDirectory) -> bytes:
        """The trusted key holder's identity key; refuses a round naming any other key holder."""
        if ctx.keyholder is None:
            raise ConfigError(
                "this client trusts no key holder, so it takes part in no ckks round: set `keyholder = ID` in "
                "[client] to the client whose certificate the CA issued with the key-holder role"
            )
        if d.keyholder != ctx.keyholder:
            raise MaliciousServerDetected(
                f"the server names client {d.keyholder} as this round's key holder; this client trusts only "
                f"client {ctx.keyholder}. Refusing the round"
            )
        if d.keyholder not in d.certificates:
            raise InvalidSignature("the directory lacks the key holder's certificate")
        holder = verify_certificate(d.certificates[d.keyholder], ctx.ca_pem)
        if holder.role != "client" or holder.client_id != d.keyholder or not holder.keyholder:
            raise InvalidSignature(
                f"client {d.keyholder}'s certificate does not carry the CA's key-holder role; "
                "issue it with `secagg certs issue ID --role keyholder`"
            )
        if ctx.client_id == d.keyholder and holder.identity_public_key != ctx.identity.public_bytes:
            raise InvalidSignature("the relayed key-holder certificate is not this client's own")
        return holder.identity_public_key

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
            client.precompute()  # the library's fast path: encryptions of zero, then encode and add
            if not self.is_holder:
                self._done = True
            return client.encrypt(self.update)
        if self.is_holder and self.step == 3:
            limit = len(self.d.participants) * self.config.max_message_bytes + (1 << 20)
            request = wire.decode(payload, max_bytes=max(limit, wire.DEFAULT_MAX_BYTES), expect=CkksDecryptRequest)
            if request.round != self.ctx.round:
                raise ReplayError(f"decrypt request of round {request.round} in round {self.ctx.round}")
            # verifies every upload against the relayed certificates and recomputes the sum
            result = self.holder.decrypt(request.aggregate, self.server_key, request.uploads, self.client_keys)
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
    keyholder = int(o["keyholder"]) if "keyholder" in o else _certified_keyholder(ctx)
    if keyholder not in ctx.participants:
        raise NotEnoughSurvivors(f"the key holder (client {keyholder}) is not connected; the round cannot run")
    directory = CkksDirectory(
        round=ctx.round, round_id=new_round_id(), dim=dim, scheme=str(o.get("scheme", "ckks")),
        value_bound=float(o["clip"]), min_clients=max(2, int(ctx.threshold)),
        participants=tuple(ctx.participants), keyholder=keyholder,
        server_certificate=ctx.server_certificate,
        certificates={cid: ctx.certificates[cid] for cid in ctx.participants},
    )
    return CkksServerRound(ctx, directory), wire.encode(directory)


def _certified_keyholder(ctx: RoundContext) -> int:
    """The one connected participant whose certificate carries the CA's key-holder role."""
    holders = [cid for cid in ctx.participants
               if cid in ctx.certificates and identity_from_pem(ctx.certificates[cid]).keyholder]
    if len(holders) != 1:
        raise NotEnoughSurvivors(
            f"{len(holders)} connected clients hold a key-holder certificate; a ckks round needs exactly one "
            "(or the `keyholder` option naming the one the clients trust)"
        )
    return holders[0]


register_mode(Mode("ckks", _server, CkksClientRound, sealed_by_sender=False))
