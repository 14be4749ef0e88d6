"""One ckks (or BFV) round as sans-IO state machines: server, client and key holder.

Every link (in process, gRPC) drives these sessions and only moves their bytes:

    server                               key holder                 client (one per participant)
    ------                               ----------                 ------
    start()        -- context request -> receive() -> contexts
    receive(kh, contexts); close_stage() -- public context ----------> receive() -> upload
    receive(c, upload) ...; close_stage() -- sum + batch 0 --> receive() -> batch received
    receive(kh, ack); close_stage()  -- batch 1 ------------> receive() -> batch received
    ...                              -- last batch ---------> receive() -> release
    receive(kh, release); close_stage(); outcome

The key holder generates the round's keys, verifies every upload in the sum before it
decrypts (see :class:`~secagg.ckks.roles.KeyHolder`) and releases the plaintext sum. The
server forwards the uploads in batches of at most ``forward_bytes`` (one decrypt stage
each), so no message grows with the number of clients and the key holder holds one
running sum, not every upload (:class:`~secagg.ckks.roles.SumCheck`); over
the network it is also a participant with its own update (:class:`ClientSession` runs a
:class:`KeyHolderSession` inside). A split BFV round (``key_holders`` > 1) has one key
holder per key: clients upload one share per key holder, each key holder releases its
decrypted share, and the server combines them (:func:`~secagg.ckks.roles.combine_shares`). Each session has an explicit stage, a transition table
and sticky failure: once a session failed it stays failed and every later call raises
:class:`~secagg.errors.SessionAborted`. A client message the server refuses raises a
typed error from :meth:`ServerSession.receive` and changes nothing (the client is listed
in ``rejected``); only :meth:`ServerSession.close_stage` fails the round.

No sockets, threads or clocks: the link owns deadlines. ``timer`` (optional) is a
callback ``timer(phase) -> context manager`` that a caller hands in to time phases
("keyholder.keygen", "client.encrypt", ...); benchmarks time through it.

Who signed what is checked against a :class:`Roster` built from a source each party
trusts: :func:`client_from_directory` builds a client's roster from the certificates a
server relays, checked by the ``check_certificate`` callback the link hands in (so the
core never imports the transport's PKI code).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from secagg import wire
from secagg.ckks.messages import (
    CkksBatchReceived,
    CkksClientSnapshot,
    CkksContextRequest,
    CkksContexts,
    CkksDecryptRequest,
    CkksDirectory,
    CkksPublicContexts,
    CkksRelease,
    CkksShareRelease,
    CkksSplitUpload,
)
from secagg.ckks.params import HeParams
from secagg.ckks.roles import (
    DecryptedShare,
    DecryptedSum,
    HeClient,
    HeRoundConfig,
    HeServer,
    KeyHolder,
    SplitClient,
    SumCheck,
    combine_shares,
)
from secagg.errors import (
    ConfigError,
    InvalidSignature,
    LocalProtocolError,
    MaliciousServerDetected,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
    SecAggError,
    SessionAborted,
    WireError,
)
from secagg.keys import IdentityKey
from secagg.rounds import CertificateCheck, Timer, no_timer

MAX_CONTEXTS_BYTES = 16 << 20  # both sealed contexts (a public context is under 1 MiB)
FORWARD_BYTES = 64 << 20  # default bound on the uploads the server forwards to a key holder in one message


@dataclass(frozen=True)
class Roster:
    """Who takes part in one round and the Ed25519 keys their messages are checked against.

    Party ``i`` of the :class:`HeRoundConfig` is client ``participants[i]``; ``keyholders``
    (one, or ``config.key_holders`` in a split round) are ids too, in key order. Each party
    builds its roster from a source it trusts (certificates checked against its CA, or its
    own configuration), never from what the server claims unchecked.
    """

    round: int
    participants: tuple[int, ...]
    keyholders: tuple[int, ...]
    client_keys: Mapping[int, bytes]  # participant id -> identity key
    keyholder_keys: tuple[bytes, ...]  # in the order of ``keyholders``
    server_key: bytes = b""

    def __post_init__(self) -> None:
        if len(self.keyholders) != len(self.keyholder_keys) or len(set(self.keyholders)) != len(self.keyholders):
            raise ConfigError("a roster needs one identity key per key holder, each key holder once")

    @property
    def party_keys(self) -> dict[int, bytes]:
        """Party index -> identity key (what the ckks roles check uploads against)."""
        return {i: self.client_keys[c] for i, c in enumerate(self.participants)}


@dataclass(frozen=True)
class Outcome:
    """What the server releases: the decrypted sum over ``included`` (participant ids)."""

    total: np.ndarray
    included: tuple[int, ...]
    weight_sum: float | None
    error_bound: float


def params_for(scheme: str) -> HeParams:
    """The default parameter set of ``scheme``."""
    if scheme == "ckks":
        return HeParams.ckks()
    if scheme == "bfv":
        return HeParams.bfv()
    raise ConfigError(f"scheme must be 'ckks' or 'bfv', got {scheme!r}")


def config_of(d: CkksDirectory) -> HeRoundConfig:
    """The HeRoundConfig every party rebuilds from a directory."""
    return HeRoundConfig(d.round_id, d.dim, len(d.participants), params_for(d.scheme), d.value_bound, False,
                       d.min_clients)


# --------------------------------------------------------------------------- server


class ServerStage(enum.Enum):
    CONTEXT = "context"
    UPLOAD = "upload"
    DECRYPT = "decrypt"
    DONE = "done"
    FAILED = "failed"


SERVER_NEXT: dict[ServerStage, ServerStage] = {
    ServerStage.CONTEXT: ServerStage.UPLOAD,
    ServerStage.UPLOAD: ServerStage.DECRYPT,
    ServerStage.DECRYPT: ServerStage.DONE,
}


class ServerSession:
    """The server's part: relay the key holders' contexts, add uploads, have the sum decrypted.

    The server holds no key (one :class:`~secagg.ckks.roles.HeServer` per key holder). In
    a split round it combines the key holders' decrypted shares (:func:`combine_shares`
    checks their range and check slots, as a single key holder does). ``forward_bytes``
    bounds the uploads forwarded to a key holder in one decrypt-stage message (at least
    one upload per message).
    """

    def __init__(self, config: HeRoundConfig, roster: Roster, identity: IdentityKey | None, *,
                 timer: Timer | None = None, forward_bytes: int = FORWARD_BYTES) -> None:
        if forward_bytes < 1:
            raise ConfigError(f"forward_bytes must be positive, got {forward_bytes}")
        if len(roster.participants) != config.n_clients:
            raise ConfigError(f"the roster lists {len(roster.participants)} participants, the round {config.n_clients}")
        if len(roster.keyholders) != config.key_holders:
            raise ConfigError(f"the roster lists {len(roster.keyholders)} key holders, the round {config.key_holders}")
        self.config, self.roster = config, roster
        self.identity = identity or IdentityKey.generate()  # the key holders check the aggregate against it
        self.stage = ServerStage.CONTEXT
        self.failure: str | None = None
        self.rejected: dict[int, str] = {}
        self._timer = timer or no_timer
        self._split = config.key_holders > 1
        self._started = False
        self._contexts: dict[int, CkksContexts] = {}  # key holder id -> its contexts
        self._he: tuple[HeServer, ...] = ()  # one per key holder, in roster order
        self._releases: dict[int, CkksRelease | CkksShareRelease] = {}
        self._result: DecryptedSum | None = None
        self._forward_bytes = forward_bytes
        self._aggregates: list[bytes] = []  # one per key holder, sent with batch 0
        self._batch, self._batches, self._per_batch = 0, 0, 1  # the decrypt batch in flight, of how many
        self._received: set[int] = set()  # key holders that confirmed the batch in flight

    @property
    def done(self) -> bool:
        return self.stage is ServerStage.DONE

    @property
    def he_servers(self) -> tuple[HeServer, ...]:
        """The key-less roles (one per key holder) once the contexts arrived."""
        return self._he

    def start(self) -> dict[int, bytes]:
        """The context request for every key holder (once)."""
        self._alive()
        if self._started:
            raise ReplayError("the round was already started")
        self._started = True
        request = wire.encode(CkksContextRequest(round=self.roster.round))
        return {h: request for h in self.roster.keyholders}

    def awaiting(self) -> frozenset[int]:
        """Who the current stage still waits for."""
        r, s = self.roster, self.stage
        waiting: set[int] = set()
        if s is ServerStage.CONTEXT:
            waiting = set(r.keyholders) - set(self._contexts)
        elif s is ServerStage.UPLOAD and self._he:
            waiting = set(r.participants) - {r.participants[i] for i in self._he[0].included}
        elif s is ServerStage.DECRYPT:
            waiting = set(r.keyholders) - (set(self._releases) if self._last_batch else self._received)
        return frozenset(waiting - set(self.rejected))

    def max_payload_bytes(self) -> int:
        """Largest message one client may send at the current stage (a link refuses more at once)."""
        k = self.config.key_holders
        if self.stage is ServerStage.CONTEXT:
            return MAX_CONTEXTS_BYTES
        if self.stage is ServerStage.UPLOAD:
            return k * self.config.max_message_bytes + (64 << 10)
        if not self._last_batch:
            return 64 << 10  # a batch confirmation
        return 8 * sum(self.config.chunk_sizes) + (64 << 10)  # the released sum (or share)

    @property
    def _last_batch(self) -> bool:
        return self._batch == self._batches - 1

    def receive(self, client_id: int, payload: bytes) -> None:
        """Check and take one client's message; a refused one raises and changes nothing."""
        self._alive()
        if client_id not in self.awaiting():
            raise ReplayError(f"client {client_id} sent a message stage {self.stage.value!r} did not ask for")
        handle = {ServerStage.CONTEXT: self._take_contexts, ServerStage.UPLOAD: self._take_upload,
                  ServerStage.DECRYPT: self._take_release if self._last_batch else self._take_batch_received}[self.stage]
        try:
            handle(client_id, payload)
        except SecAggError as exc:
            self.rejected[client_id] = f"{type(exc).__name__}: {exc}"
            raise

    def close_stage(self) -> dict[int, bytes]:
        """End the current stage; the messages of the next one. A failure here is sticky."""
        self._alive()
        if not self._started:
            raise ReplayError("start() the round first")
        more_batches = self.stage is ServerStage.DECRYPT and not self._last_batch
        close = {ServerStage.CONTEXT: self._open_uploads, ServerStage.UPLOAD: self._request_decryption,
                 ServerStage.DECRYPT: self._next_batch if more_batches else self._finish}[self.stage]
        try:
            out = close()
        except SecAggError as exc:
            self.stage, self.failure = ServerStage.FAILED, f"{type(exc).__name__}: {exc}"
            raise
        if not more_batches:
            self.stage = SERVER_NEXT[self.stage]
        return out

    def outcome(self) -> Outcome:
        if not self.done:
            raise ReplayError(f"the round has no outcome (stage {self.stage.value!r})")
        result = self._result
        included = tuple(sorted(self.roster.participants[i] for i in result.included))
        return Outcome(result.values, included, result.weight_sum, result.error_bound)

    def _alive(self) -> None:
        if self.stage is ServerStage.FAILED:
            raise SessionAborted(f"the round failed ({self.failure}); start a new one")
        if self.stage is ServerStage.DONE:
            raise ReplayError("the round already finished")

    def _from_keyholder(self, client_id: int, payload: bytes, expect):
        key = self.roster.keyholder_keys[self.roster.keyholders.index(client_id)]
        _, msg = wire.open_sealed(payload, {client_id: key}.get, expect=expect)
        if msg.round != self.roster.round:
            raise ReplayError(f"key holder message of round {msg.round} in round {self.roster.round}")
        return msg

    def _take_contexts(self, client_id: int, payload: bytes) -> None:
        self._contexts[client_id] = self._from_keyholder(client_id, payload, CkksContexts)

    def _take_upload(self, client_id: int, payload: bytes) -> None:
        party = self.roster.participants.index(client_id)
        with self._timer("server.receive"):
            if self._split:
                msg = wire.decode(payload, max_bytes=self.max_payload_bytes(), expect=CkksSplitUpload)
                if msg.round != self.roster.round or len(msg.uploads) != len(self._he):
                    raise ReplayError(f"client {client_id}'s upload is not one upload per key holder for this round")
                parts = msg.uploads
            else:
                parts = (payload,)
            # every part is checked before any is added: the key holders' sums cover the same clients
            checked = [he.check(part, sender=party) for he, part in zip(self._he, parts)]
            for he, c in zip(self._he, checked):
                he.commit(c)

    def _take_batch_received(self, client_id: int, payload: bytes) -> None:
        ack = self._from_keyholder(client_id, payload, CkksBatchReceived)
        expected = min((self._batch + 1) * self._per_batch, len(self._he[0].uploads))
        if ack.index != self._batch or ack.checked != expected:
            raise RemoteProtocolError(
                f"the key holder confirmed batch {ack.index} ({ack.checked} uploads), not batch {self._batch} "
                f"({expected} uploads)", client_id)
        self._received.add(client_id)

    def _take_release(self, client_id: int, payload: bytes) -> None:
        he = self._he[self.roster.keyholders.index(client_id)]
        release = self._from_keyholder(client_id, payload, CkksShareRelease if self._split else CkksRelease)
        size = sum(self.config.chunk_sizes) if self._split else self.config.dim
        if len(release.values) != 8 * size:
            raise WireError(f"the released sum has {len(release.values) // 8} values, the round {size}")
        if tuple(sorted(release.included)) != tuple(sorted(he.included)):
            raise RemoteProtocolError("the key holder released a sum over other clients than the server's", client_id)
        if self._split and release.fingerprint != he.fingerprint:
            raise RemoteProtocolError("the key holder released a share under another key", client_id)
        self._releases[client_id] = release

    def _open_uploads(self) -> dict[int, bytes]:
        r = self.roster
        if len(self._contexts) != len(r.keyholders):
            raise NotEnoughSurvivors("the key holder did not send the round's keys; nothing can be aggregated")
        contexts = [self._contexts[h] for h in r.keyholders]
        with self._timer("server.setup"):
            self._he = tuple(HeServer(self.config, c.for_server, key, r.party_keys, identity=self.identity)
                             for c, key in zip(contexts, r.keyholder_keys))
        if self._split:
            public = wire.encode(CkksPublicContexts(r.round, tuple(c.for_clients for c in contexts)))
        else:
            public = contexts[0].for_clients
        return {c: public for c in r.participants}

    def _request_decryption(self) -> dict[int, bytes]:
        with self._timer("server.aggregate"):
            self._aggregates = [he.aggregate() for he in self._he]  # NotEnoughSurvivors below min_clients
        largest = max(len(u) for he in self._he for u in he.uploads)
        self._per_batch = max(1, self._forward_bytes // largest)
        self._batches = -(-len(self._he[0].uploads) // self._per_batch)
        self._batch = 0
        return self._batch_messages()

    def _next_batch(self) -> dict[int, bytes]:
        missing = set(self.roster.keyholders) - self._received
        if missing:
            raise NotEnoughSurvivors(f"key holder(s) {sorted(missing)} did not confirm batch {self._batch} of the "
                                     "uploads; nothing can be decrypted")
        self._batch += 1
        self._received = set()
        return self._batch_messages()

    def _batch_messages(self) -> dict[int, bytes]:
        """Batch ``self._batch`` of the uploads for every key holder (batch 0 with the aggregate)."""
        i, k = self._batch, self._per_batch
        return {h: wire.encode(CkksDecryptRequest(self.roster.round, i, self._batches,
                                                  self._aggregates[j] if i == 0 else b"",
                                                  he.uploads[i * k : (i + 1) * k]))
                for j, (h, he) in enumerate(zip(self.roster.keyholders, self._he))}

    def _finish(self) -> dict[int, bytes]:
        r, cfg = self.roster, self.config
        if len(self._releases) != len(r.keyholders):
            raise NotEnoughSurvivors("the key holder did not return the decrypted sum")
        if self._split:
            shares = [DecryptedShare(np.frombuffer(self._releases[h].values, dtype="<i8").astype(np.int64),
                                     tuple(self._releases[h].included), self._releases[h].fingerprint)
                      for h in r.keyholders]
            with self._timer("server.combine"):
                self._result = combine_shares(cfg, shares)  # range and check slots of the combined sum
        else:
            release = self._releases[r.keyholders[0]]
            included = tuple(sorted(release.included))
            self._result = DecryptedSum(np.frombuffer(release.values, dtype="<f8").copy(), included,
                                        release.weight_sum if cfg.weighted else None,
                                        cfg.error_bound(len(included)))
        return {}


# --------------------------------------------------------------------------- key holder


class KeyHolderStage(enum.Enum):
    REQUEST = "request"
    DECRYPT = "decrypt"
    DONE = "done"
    FAILED = "failed"


KEYHOLDER_NEXT: dict[KeyHolderStage, KeyHolderStage] = {
    KeyHolderStage.REQUEST: KeyHolderStage.DECRYPT,
    KeyHolderStage.DECRYPT: KeyHolderStage.DONE,
}


class _Sticky:
    """A session that fails for good on its first error."""

    stage: enum.Enum
    failure: str | None = None

    def _step(self, handlers: Mapping, nxt: Mapping, payload: bytes):
        if self.stage.value == "failed":
            raise SessionAborted(f"this round failed ({self.failure}); nothing more is sent")
        if self.stage not in handlers:
            raise ReplayError("the server sent a message this party did not expect")
        try:
            reply = handlers[self.stage](payload)
        except Exception as exc:
            self.stage, self.failure = type(self.stage)("failed"), f"{type(exc).__name__}: {exc}"
            raise
        self.stage = self._next(nxt)
        return reply

    def _next(self, nxt: Mapping) -> enum.Enum:
        """The stage after a handled message (a stage that takes several messages stays)."""
        return nxt[self.stage]


class KeyHolderSession(_Sticky):
    """One key holder's part: keys on request, then one verified decryption.

    ``keyholder`` is its id in ``roster.keyholders``; it seals its contexts and its
    release with that id. The uploads in the sum are checked against ``roster.party_keys``
    and the aggregate against ``roster.server_key``, both from its own trusted roster.
    """

    def __init__(self, config: HeRoundConfig, roster: Roster, keyholder: int, identity: IdentityKey, *,
                 timer: Timer | None = None) -> None:
        if keyholder not in roster.keyholders:
            raise ConfigError(f"{keyholder} is not a key holder of this round")
        self.config, self.roster, self.id, self.identity = config, roster, keyholder, identity
        self.stage = KeyHolderStage.REQUEST
        self.holder: KeyHolder | None = None
        self.check: SumCheck | None = None  # the aggregate being checked, batch by batch
        self.batches = 0  # how many batches the server announced (0: none received yet)
        self.batches_checked = 0
        self._timer = timer or no_timer

    def _next(self, nxt: Mapping) -> enum.Enum:
        if self.stage is KeyHolderStage.DECRYPT and self.check is not None:
            return self.stage  # more batches of uploads to come
        return nxt[self.stage]

    @property
    def done(self) -> bool:
        return self.stage is KeyHolderStage.DONE

    def receive(self, payload: bytes) -> bytes:
        return self._step({KeyHolderStage.REQUEST: self._keys, KeyHolderStage.DECRYPT: self._decrypt},
                          KEYHOLDER_NEXT, payload)

    def _keys(self, payload: bytes) -> bytes:
        r = self.roster
        request = wire.decode(payload, expect=CkksContextRequest)
        if request.round != r.round:
            raise ReplayError(f"context request of round {request.round} in round {r.round}")
        with self._timer("keyholder.keygen"):
            self.holder = KeyHolder(self.config, identity=self.identity)
            reply = CkksContexts(r.round, self.holder.context_for_clients(), self.holder.context_for_server())
        return wire.seal(reply, self.id, self.identity)

    def _decrypt(self, payload: bytes) -> bytes:
        """One batch of uploads: check and add them; after the last, release the verified sum."""
        r = self.roster
        request = wire.decode(payload, expect=CkksDecryptRequest)
        if request.round != r.round:
            raise ReplayError(f"decrypt request of round {request.round} in round {r.round}")
        expected = self.batches_checked
        if request.index != expected or (self.batches and request.count != self.batches):
            raise ReplayError(f"the server sent upload batch {request.index} of {request.count}; expected batch "
                              f"{expected} of {self.batches or request.count}")
        with self._timer("keyholder.verify"):
            if self.check is None:  # checks the aggregate itself; once per round, answered or refused
                self.batches = request.count
                self.check = self.holder.begin_verify(request.aggregate, r.server_key, r.party_keys)
            checked = self.check.add(request.uploads)  # each upload against the trusted keys, into a running sum
            self.batches_checked += 1
            if request.index < request.count - 1:
                return wire.seal(CkksBatchReceived(r.round, request.index, checked), self.id, self.identity)
            verified, self.check = self.check.finish(), None
        with self._timer("keyholder.release"):
            if self.config.key_holders > 1:
                share = self.holder.release_share(verified)
                reply = CkksShareRelease(r.round, share.values.astype("<i8").tobytes(), tuple(share.included),
                                         share.fingerprint)
            else:
                result = self.holder.release(verified)
                weight_sum = 0.0 if result.weight_sum is None else float(result.weight_sum)
                reply = CkksRelease(r.round, result.values.astype("<f8").tobytes(), tuple(result.included),
                                    weight_sum)
        return wire.seal(reply, self.id, self.identity)


# --------------------------------------------------------------------------- client


class ClientStage(enum.Enum):
    REQUEST = "request"  # key holder only: waits for the context request
    CONTEXT = "context"  # waits for the public context(s), then uploads
    DECRYPT = "decrypt"  # key holder only: waits for the sum to decrypt
    DONE = "done"
    FAILED = "failed"


CLIENT_NEXT: dict[bool, dict[ClientStage, ClientStage]] = {  # keyed by "is a key holder"
    False: {ClientStage.CONTEXT: ClientStage.DONE},
    True: {ClientStage.REQUEST: ClientStage.CONTEXT, ClientStage.CONTEXT: ClientStage.DECRYPT,
           ClientStage.DECRYPT: ClientStage.DONE},
}


class ClientSession(_Sticky):
    """One participant: encrypt and upload its update under the key holders' public keys.

    When this client is one of the round's key holders it also answers the context request
    and the decrypt request through a :class:`KeyHolderSession`. ``update`` may be left
    None and given later with :meth:`set_update`, before the public context arrives (a
    Flower node trains only when the upload is asked for). :meth:`snapshot` and
    :meth:`restore` carry the session from one process to the next.
    """

    def __init__(self, config: HeRoundConfig, roster: Roster, client_id: int, identity: IdentityKey,
                 update: np.ndarray | None, *, weight: float | None = None, precompute: bool = True,
                 timer: Timer | None = None) -> None:
        if client_id not in roster.participants:
            raise ConfigError("this client is not a participant of the round")
        self.config, self.roster, self.client_id, self.identity = config, roster, client_id, identity
        self.update, self.weight, self.precompute = update, weight, precompute
        self.is_holder = client_id in roster.keyholders
        self.keyholder = KeyHolderSession(config, roster, client_id, identity, timer=timer) if self.is_holder else None
        self.stage = ClientStage.REQUEST if self.is_holder else ClientStage.CONTEXT
        self._timer = timer or no_timer

    @property
    def done(self) -> bool:
        return self.stage is ClientStage.DONE

    def set_update(self, update: np.ndarray) -> None:
        """This client's update, clipped to the round's per-coordinate bound ``value_bound``."""
        x = np.asarray(update, dtype=np.float64).ravel()
        if x.size != self.config.dim:
            raise ConfigError(f"this client's update has {x.size} values, the round expects {self.config.dim}")
        self.update = np.clip(x, -self.config.value_bound, self.config.value_bound)

    def snapshot(self) -> bytes:
        """This session's state as bytes (:class:`~secagg.ckks.messages.CkksClientSnapshot`).

        A key holder's snapshot holds the round's secret key: keep it on this client's
        machine, as the live session would be. The update is not kept (:meth:`set_update`).
        """
        kh = self.keyholder
        secret, public, used = kh.holder.export_state() if kh is not None and kh.holder is not None else (b"", b"", False)
        checking = kh is not None and kh.check is not None and not kh.check.closed
        check = kh.check.export_state() if checking else ((), (), (), ())
        return wire.encode(CkksClientSnapshot(
            self.config.round_id, self.client_id, self.stage.value, self.failure or "",
            kh.stage.value if kh is not None else "", secret, public, used,
            kh.batches if kh is not None else 0, kh.batches_checked if kh is not None else 0, checking, *check,
        ))

    def restore(self, data: bytes) -> None:
        """Continue from :meth:`snapshot` bytes. This session must be new, built for the same
        round (same directory, checked again by its builder) and the same client."""
        snap = wire.decode(data, expect=CkksClientSnapshot)
        fresh = self.stage is (ClientStage.REQUEST if self.is_holder else ClientStage.CONTEXT)
        if not fresh or snap.round_id != self.config.round_id or snap.client_id != self.client_id:
            raise LocalProtocolError("the snapshot belongs to another round or client, or this session already ran")
        try:
            self.stage = ClientStage(snap.stage)
            kh = self.keyholder
            if kh is not None:
                kh.stage = KeyHolderStage(snap.keyholder_stage)
                kh.batches, kh.batches_checked = snap.batches, snap.batches_checked
                if snap.secret_context:
                    kh.holder = KeyHolder.restore(self.config, self.identity, snap.secret_context,
                                                  snap.public_context, snap.used)
                if snap.checking:
                    kh.check = SumCheck.restore(kh.holder, self.roster.party_keys, snap.check_included,
                                                snap.check_chunks, snap.check_senders, snap.check_total)
        except (ValueError, AttributeError):
            raise WireError("the session snapshot does not fit this client's round") from None
        self.failure = snap.failure or None

    def receive(self, payload: bytes) -> bytes:
        handlers = {ClientStage.CONTEXT: self._upload}
        if self.keyholder is not None:
            handlers[ClientStage.REQUEST] = handlers[ClientStage.DECRYPT] = self.keyholder.receive
        return self._step(handlers, CLIENT_NEXT[self.is_holder], payload)

    def _next(self, nxt: Mapping) -> enum.Enum:
        if self.stage is ClientStage.DECRYPT and not self.keyholder.done:
            return self.stage  # the key holder waits for more batches of uploads
        return nxt[self.stage]

    def _upload(self, payload: bytes) -> bytes:
        if self.update is None:
            raise LocalProtocolError("this client has no update to upload: call set_update() before the upload stage")
        r, party = self.roster, self.roster.participants.index(self.client_id)
        split = self.config.key_holders > 1
        with self._timer("client.setup"):
            if split:
                msg = wire.decode(payload, expect=CkksPublicContexts)
                if msg.round != r.round:
                    raise ReplayError(f"public contexts of round {msg.round} in round {r.round}")
                client = SplitClient(party, self.config, msg.contexts, r.keyholder_keys, identity=self.identity)
            else:
                client = HeClient(party, self.config, payload, r.keyholder_keys[0], identity=self.identity)
        if self.precompute:  # the library's fast path: encryptions of zero, then encode and add
            with self._timer("client.precompute"):
                client.precompute()
        with self._timer("client.encrypt"):
            chunks = client.encrypt_chunks(self.update, weight=self.weight)
        with self._timer("client.sign"):
            if split:
                return wire.encode(CkksSplitUpload(r.round, client.seal_uploads(chunks)))
            return client.seal_upload(chunks)


# --------------------------------------------------------------------------- from a relayed directory


def client_from_directory(directory: CkksDirectory, *, round: int, client_id: int, identity: IdentityKey,
                          update: np.ndarray | None, trusted_keyholder: int | None,
                          check_certificate: CertificateCheck, min_participants: int = 2) -> ClientSession:
    """A client's session for a round a server announced; refuses a round it must not join.

    ``trusted_keyholder`` is the key holder named in the client's own configuration; a
    directory naming any other refuses the round (the server cannot promote a client).
    ``check_certificate(pem)`` verifies a relayed certificate against the client's CA and
    raises on a bad one. Clips the update to the round's per-coordinate bound; without one
    (None), pass it later with :meth:`ClientSession.set_update`. ``min_participants`` (the
    client's policy): the round must let the key holder decrypt only sums of at least that
    many clients -- the key holder, checking its own directory, so never decrypts a smaller
    sum, whatever the server told other clients.
    """
    d = directory
    if d.round != round:
        raise ReplayError(f"directory of round {d.round} sent in round {round}")
    if client_id not in d.participants:
        raise ConfigError("this client is not a participant of the round")
    holder_key = _trusted_keyholder_key(d, client_id, identity, trusted_keyholder, check_certificate)
    if d.min_clients < min_participants or len(d.participants) < min_participants:
        raise MaliciousServerDetected(
            f"the round lets the key holder decrypt a sum of {d.min_clients} of {len(d.participants)} clients; this "
            f"client takes part only in sums of at least {min_participants} (its policy's min_participants). "
            "Refusing the round")
    server = check_certificate(d.server_certificate)
    if server.role != "server":
        raise InvalidSignature("the relayed server certificate is not a server certificate")
    if set(d.certificates) != set(d.participants):
        raise InvalidSignature("the directory must relay the certificate of every participant, and only theirs")
    client_keys: dict[int, bytes] = {}
    for cid in d.participants:
        peer = check_certificate(d.certificates[cid])
        if peer.role != "client" or peer.client_id != cid:
            raise InvalidSignature(f"the certificate relayed for client {cid} names someone else")
        client_keys[cid] = peer.identity_public_key
    if client_keys[client_id] != identity.public_bytes:
        raise InvalidSignature("the directory does not hold this client's own certificate")
    roster = Roster(d.round, tuple(d.participants), (d.keyholder,), client_keys, (holder_key,),
                    server.identity_public_key)
    session = ClientSession(config_of(d), roster, client_id, identity, None)
    if update is not None:
        session.set_update(update)
    return session


def _trusted_keyholder_key(d: CkksDirectory, client_id: int, identity: IdentityKey, trusted: int | None,
                           check_certificate: CertificateCheck) -> bytes:
    """The trusted key holder's identity key; refuses a round naming any other key holder."""
    if trusted is None:
        raise ConfigError(
            "this client trusts no key holder, so it takes part in no ckks round: set `keyholder = ID` in "
            "[client] to the client whose certificate the CA issued with the key-holder role"
        )
    if d.keyholder != trusted:
        raise MaliciousServerDetected(
            f"the server names client {d.keyholder} as this round's key holder; this client trusts only "
            f"client {trusted}. Refusing the round"
        )
    if d.keyholder not in d.certificates:
        raise InvalidSignature("the directory lacks the key holder's certificate")
    holder = check_certificate(d.certificates[d.keyholder])
    if holder.role != "client" or holder.client_id != d.keyholder or not holder.keyholder:
        raise InvalidSignature(
            f"client {d.keyholder}'s certificate does not carry the CA's key-holder role; "
            "issue it with `secagg certs issue ID --role keyholder`"
        )
    if client_id == d.keyholder and holder.identity_public_key != identity.public_bytes:
        raise InvalidSignature("the relayed key-holder certificate is not this client's own")
    return holder.identity_public_key
