"""Client side of the masking protocol, as a sans-IO state machine.

Theory of operation (Bonawitz et al., CCS 2017, "Practical Secure Aggregation", with the
SecAgg+ neighbourhoods of Bell et al., CCS 2020):

  0. advertise  -- on RoundConfig: check it against this client's own ClientPolicy (enough
                   participants, threshold and degree at least what secagg.protocol.plan
                   requires, a round id never seen with this server); fresh X25519 keys
                   (c for share encryption, s for masks), sent signed.
  1. share      -- on KeyDirectory (every advert): verify every signature and key; derive
                   the graph seed from all adverts (round_digest) and so the neighbours;
                   draw the self-mask seed b; Shamir-share b and s_sk t-of-k among the
                   neighbours; encrypt each bundle to its recipient (AES-GCM, X25519+HKDF).
  2. masked     -- on ShareDelivery (the neighbours that shared, U2): upload
                   y = encode(x) + PRG(b) + sum_v +-PRG(s_uv)  mod 2^bits. A share that
                   does not decrypt is reported at unmask time, not fatal.
  3. consistency-- on ConsistencyRequest(U3): sign (round, digest, U3).
  4. unmask     -- on UnmaskRequest: check >= t valid signatures over the *same* U3 and
                   that the survivor and dropped lists are exactly U3 and U2 \\ U3 (so no
                   client is ever both); then reveal b-shares of survivors and
                   s_sk-shares of dropped neighbours, once.

Rules: the client sees no sockets, threads or clocks; ``receive`` takes the server's
sealed bytes and returns the sealed reply. Any error is sticky: the session moves to
ABORTED, reveals nothing more, and every later call raises :class:`SessionAborted`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from secagg import shamir, wire
from secagg.encoding import check_vector
from secagg.errors import (
    AlreadyFinalized,
    InvalidPublicKey,
    InvalidShare,
    LocalProtocolError,
    MaliciousServerDetected,
    NotEnoughSurvivors,
    SecAggError,
    SessionAborted,
    UnexpectedMessage,
    WireError,
)
from secagg.keys import (
    LABEL_SHARE_ENCRYPTION,
    IdentityKey,
    KeyPair,
    agree,
    check_public_key,
    decrypt,
    encrypt,
    pair_context,
    verify_signature,
)
from secagg.prg import MaskAccumulator, check_workers
from secagg.protocol.common import (
    SECRET_BYTES,
    SERVER_ID,
    bytes_per_element,
    codec_of,
    graph_of,
    pack_residues,
    pairwise_seed,
    pairwise_sign,
    round_digest,
    seed_commitment,
)
from secagg.protocol.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    consistency_payload,
)
from secagg.protocol.plan import ClientPolicy, check_round


# The share plaintext is two raw shares (it was a msgpack ShareBundle): the label names that
# format, so a ciphertext of the other one fails authentication instead of being misread.
SHARE_AD_LABEL = b"secagg/v2/share-bundle|"


class ClientState(enum.Enum):
    WAIT_CONFIG = "wait_config"
    WAIT_DIRECTORY = "wait_directory"
    WAIT_SHARES = "wait_shares"
    WAIT_CONSISTENCY = "wait_consistency"
    WAIT_UNMASK = "wait_unmask"
    DONE = "done"
    ABORTED = "aborted"


# Rule: every state transition of the client lives in this table.
TRANSITIONS: dict[ClientState, dict[type, ClientState]] = {
    ClientState.WAIT_CONFIG: {RoundConfig: ClientState.WAIT_DIRECTORY},
    ClientState.WAIT_DIRECTORY: {KeyDirectory: ClientState.WAIT_SHARES},
    ClientState.WAIT_SHARES: {ShareDelivery: ClientState.WAIT_CONSISTENCY},
    ClientState.WAIT_CONSISTENCY: {ConsistencyRequest: ClientState.WAIT_UNMASK},
    ClientState.WAIT_UNMASK: {UnmaskRequest: ClientState.DONE},
    ClientState.DONE: {},
    ClientState.ABORTED: {},
}


def _open_directory(
    config: RoundConfig, sealed: Mapping[int, bytes], key_of: Callable[[int], bytes | None]
) -> tuple[Mapping[int, AdvertiseKeys], bytes]:
    """Every relayed advert, opened and checked, and the round digest they give.

    Each advert must be signed by its client (``key_of``, the client's own identity
    directory) for this round and carry two usable X25519 keys, and no key may appear
    twice; anything else is a :class:`MaliciousServerDetected` (a badly signed advert, the
    :class:`InvalidSignature` of opening it). The client checks all of them, not only its
    neighbours': the graph is drawn from the digest of all adverts, so an unchecked one
    would let the server steer it.

    The result is a pure function of the round, its client list, the relayed adverts and
    the identity keys they are checked against, all public; it is remembered per process
    (successes only, a few directories), so the n clients of a simulated round open the
    same n adverts once rather than n^2 times (25 ms a client at n = 1,000). A client
    whose directory or identity keys differ in any byte misses and checks its own.
    """
    key = (config.round_id, config.clients, tuple(sealed.items()), tuple(map(key_of, sealed)))
    known = _OPENED_DIRECTORIES.get(key)
    if known is not None:
        return known
    adverts: dict[int, AdvertiseKeys] = {}
    clients = frozenset(config.clients)
    for peer, advert_bytes in sealed.items():
        if peer not in clients:
            raise MaliciousServerDetected(f"server relayed keys of {peer}, who is not in the round", SERVER_ID)
        sender, advert = wire.open_sealed(advert_bytes, key_of, expect=AdvertiseKeys)
        if sender != peer or advert.client != peer or advert.round_id != config.round_id:
            raise MaliciousServerDetected(f"keys relayed for {peer} were signed for another party or round", SERVER_ID)
        try:
            check_public_key(advert.cipher_public_key)
            check_public_key(advert.mask_public_key)
        except InvalidPublicKey:
            raise MaliciousServerDetected(
                f"server relayed an unusable (low-order) key of client {peer}; an honest server refuses it",
                SERVER_ID,
            ) from None
        adverts[peer] = advert
    all_keys = [k for a in adverts.values() for k in (a.cipher_public_key, a.mask_public_key)]
    if len(set(all_keys)) != len(all_keys):
        raise MaliciousServerDetected("two parties advertised the same public key", SERVER_ID)
    opened = MappingProxyType(adverts), round_digest(config.round_id, adverts)  # read-only: shared by sessions
    _OPENED_DIRECTORIES[key] = opened
    if len(_OPENED_DIRECTORIES) > DIRECTORIES_KEPT:
        _OPENED_DIRECTORIES.pop(next(iter(_OPENED_DIRECTORIES)))  # the oldest first
    return opened


#: checked key directories kept per process (see _open_directory): one per round in flight
DIRECTORIES_KEPT = 4
_OPENED_DIRECTORIES: dict[tuple, tuple[Mapping[int, AdvertiseKeys], bytes]] = {}


@wire.message
class ClientSnapshot(wire.Message):
    """A paused :class:`ClientSession` (see ``ClientSession.snapshot``). Holds this round's
    secrets: it never leaves the client's own machine."""

    TYPE = "masking.client_snapshot.v2"  # v2: digest, unusable
    client_id: int
    state: str
    abort_reason: str
    identities: dict[int, bytes]
    config: bytes  # encoded RoundConfig, or b"" before the first message
    cipher_private: bytes
    mask_private: bytes
    self_seed: bytes
    peer_cipher_keys: dict[int, bytes]
    peer_mask_keys: dict[int, bytes]
    held: dict[int, bytes]  # encoded ShareBundle by owner
    sharers: tuple[int, ...]
    digest: bytes  # round_digest of the adverts (the graph seed), b"" before the key directory
    unusable: tuple[int, ...]
    signed_survivors: tuple[int, ...]
    signed: bool
    upload_bytes: int


class ClientSession:
    """One client's part in one round. Create a new session for every round."""

    def __init__(
        self,
        client_id: int,
        identity: IdentityKey,
        identities: Mapping[int, bytes],
        *,
        update: np.ndarray | None = None,
        policy: ClientPolicy | None = None,
        rounding_seed: bytes | None = None,
        integer_noise: Callable[[int, float], np.ndarray] | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
        workers: int = 1,
    ) -> None:
        """``identities`` maps party id -> Ed25519 public key (the server's is ``SERVER_ID``).

        ``workers``: threads that expand this client's masks (1: serial, the default); the
        masked vector is bit-identical whatever the count (see :class:`secagg.prg.MaskAccumulator`).

        ``integer_noise(dim, scale)`` returns this client's share of distributed DP noise
        in integer (quantized) units; it is added after rounding and before masking, so it
        survives quantization and the server only sees the noisy sum.
        """
        if client_id < 1:  # a Shamir share is the polynomial at the client id: never at 0
            raise LocalProtocolError(f"client ids start at 1, got {client_id}")
        self.client_id = client_id
        self._identity = identity
        self._identities = dict(identities)
        self._policy = policy or ClientPolicy()
        self._update = None if update is None else check_vector(update)
        self._rounding_seed = rounding_seed
        self._integer_noise = integer_noise
        self._randbytes = randbytes
        self._workers = check_workers(workers)
        self.state = ClientState.WAIT_CONFIG
        self.abort_reason: str | None = None
        # Per-round secrets; dropped as soon as they are no longer needed.
        self._config: RoundConfig | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._cipher_keys: KeyPair | None = None
        self._mask_keys: KeyPair | None = None
        self._self_seed: bytes | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}  # id -> (cipher_pk, mask_pk)
        self._share_keys: dict[int, bytes] = {}  # id -> share-encryption key, until shares are in
        self._held: dict[int, ShareBundle] = {}  # shares I hold, by owner (including my own)
        self._sharers: frozenset[int] = frozenset()  # U2 within my neighbourhood
        self._unusable: set[int] = set()  # sharers whose encrypted share did not decrypt
        self._digest = b""
        self._signed_survivors: tuple[int, ...] | None = None
        self.upload_bytes = 0

    # -- public API -------------------------------------------------------------------

    def set_update(self, update: np.ndarray) -> None:
        """Provide (or replace) the update before the masked-input stage."""
        if self.state in (ClientState.WAIT_CONSISTENCY, ClientState.WAIT_UNMASK, ClientState.DONE):
            raise AlreadyFinalized("the masked input was already sent; the update cannot change")
        self._update = check_vector(update)

    def receive(self, data: bytes) -> bytes:
        """Consume one sealed server message; return the sealed reply."""
        reply = self.receive_view(data)
        return reply if isinstance(reply, bytes) else bytes(reply)

    def receive_view(self, data: bytes | memoryview) -> bytes | memoryview:
        """:meth:`receive` without copying the masked input out of the buffer it was sealed in.

        The masked-input reply is a read-only view of one buffer holding the whole sealed
        message (the masked vector is encoded and masked where it lies), so a link that
        can send a bytes-like object -- the in-process round, the gRPC client -- holds one
        update-sized buffer per client, not four.
        """
        if self.state is ClientState.ABORTED:
            raise SessionAborted(f"session aborted earlier ({self.abort_reason}); start a new one")
        try:
            _, msg = wire.open_sealed(data, self._identities_of_server)
            next_state = TRANSITIONS[self.state].get(type(msg))
            if next_state is None:
                raise UnexpectedMessage(
                    f"client {self.client_id} in state {self.state.value} cannot handle {type(msg).TYPE}",
                    SERVER_ID,
                )
            if self._config is not None and msg.round_id != self._config.round_id:
                raise UnexpectedMessage("message belongs to another round (replayed or misrouted)", SERVER_ID)
            reply = self._HANDLERS[type(msg)](self, msg)
            self.state = next_state
        except SecAggError as exc:
            self._abort(exc)
            raise
        except Exception as exc:  # a bug must not leave a half-updated session usable
            self._abort(exc)
            raise
        # The masked input arrives sealed already (built in place, see _on_shares).
        sealed = reply if isinstance(reply, memoryview) else wire.seal(reply, self.client_id, self._identity)
        self.upload_bytes += len(sealed)
        return sealed

    def snapshot(self) -> bytes:
        """This session's state as bytes, to continue the round in another process.

        For hosts that keep no Python object between two messages of a round (a Flower
        SuperNode runs its ClientApp afresh for every message). The bytes hold this
        round's secrets (private keys, self-mask seed, the shares held for neighbours):
        keep them on the client's machine, as the live session would be. The update,
        rounding seed and noise callback are not kept: pass the update again with
        :meth:`set_update` before the masked-input stage.
        """
        def raw(keys: KeyPair | None) -> bytes:
            return b"" if keys is None else keys.private_bytes()

        return wire.encode(ClientSnapshot(
            client_id=self.client_id, state=self.state.value, abort_reason=self.abort_reason or "",
            identities=dict(self._identities),
            config=b"" if self._config is None else wire.encode(self._config),
            cipher_private=raw(self._cipher_keys), mask_private=raw(self._mask_keys),
            self_seed=self._self_seed or b"",
            peer_cipher_keys={p: k[0] for p, k in self._peer_keys.items()},
            peer_mask_keys={p: k[1] for p, k in self._peer_keys.items()},
            held={owner: wire.encode(bundle) for owner, bundle in self._held.items()},
            sharers=tuple(sorted(self._sharers)), digest=self._digest, unusable=tuple(sorted(self._unusable)),
            signed_survivors=self._signed_survivors or (), signed=self._signed_survivors is not None,
            upload_bytes=self.upload_bytes,
        ))

    @classmethod
    def resume(cls, data: bytes, identity: IdentityKey, *, policy: ClientPolicy | None = None,
               randbytes: Callable[[int], bytes] = os.urandom) -> ClientSession:
        """Rebuild a session from :meth:`snapshot` bytes; ``identity`` is the client's own key.

        The client's policy is the caller's, never the snapshot's. A snapshot of an aborted
        session resumes aborted.
        """
        snap = wire.decode(data, expect=ClientSnapshot)
        session = cls(snap.client_id, identity, snap.identities, policy=policy, randbytes=randbytes)
        if session._identities.get(snap.client_id) not in (None, identity.public_bytes):
            raise LocalProtocolError("the snapshot belongs to another identity key")
        try:
            session.state = ClientState(snap.state)
        except ValueError:
            raise WireError(f"unknown client state {snap.state!r} in a session snapshot") from None
        session.abort_reason = snap.abort_reason or None
        if snap.config:
            session._config = wire.decode(snap.config, expect=RoundConfig)
        if snap.digest:
            if session._config is None:
                raise WireError("session snapshot: a graph digest without a round configuration")
            session._digest = snap.digest
            session._neighbours = graph_of(session._config, snap.digest).neighbours(snap.client_id)
        session._unusable = set(snap.unusable)
        session._cipher_keys = KeyPair.from_private_bytes(snap.cipher_private) if snap.cipher_private else None
        session._mask_keys = KeyPair.from_private_bytes(snap.mask_private) if snap.mask_private else None
        session._self_seed = snap.self_seed or None
        if set(snap.peer_cipher_keys) != set(snap.peer_mask_keys):
            raise WireError("session snapshot: peer key maps disagree")
        session._peer_keys = {p: (snap.peer_cipher_keys[p], snap.peer_mask_keys[p]) for p in snap.peer_cipher_keys}
        session._held = {owner: wire.decode(b, expect=ShareBundle) for owner, b in snap.held.items()}
        session._sharers = frozenset(snap.sharers)
        session._signed_survivors = tuple(snap.signed_survivors) if snap.signed else None
        session.upload_bytes = snap.upload_bytes
        return session

    # -- stage handlers -----------------------------------------------------------------

    def _on_config(self, config: RoundConfig) -> AdvertiseKeys:
        if self.client_id not in config.clients:
            raise UnexpectedMessage("this client is not part of the round", SERVER_ID)
        refusal = check_round(len(config.clients), config.degree, config.threshold, self._policy)
        if refusal is not None:
            raise MaliciousServerDetected(f"{refusal}; refusing the round", SERVER_ID)
        if config.dim > self._policy.max_dim:
            raise LocalProtocolError(f"round dimension {config.dim} exceeds this client's limit")
        codec_of(config)  # validates bits / clip / scale / overflow before any work
        if self._update is not None and self._update.shape[0] != config.dim:
            raise LocalProtocolError(f"update has {self._update.shape[0]} entries, the round expects {config.dim}")
        self._policy.round_ids.claim(self._identity.public_bytes, self._identities[SERVER_ID], config.round_id)
        self._config = config
        self._cipher_keys = KeyPair.generate(self._randbytes(32))
        self._mask_keys = KeyPair.generate(self._randbytes(32))
        return AdvertiseKeys(config.round_id, self.client_id, self._cipher_keys.public_bytes, self._mask_keys.public_bytes)

    def _on_directory(self, msg: KeyDirectory) -> EncryptedShares:
        config = self._require_config()
        adverts, self._digest = _open_directory(config, msg.adverts, self._identities_of_client)
        mine = adverts.get(self.client_id)
        if mine is None or (mine.cipher_public_key, mine.mask_public_key) != (
            self._cipher_keys.public_bytes, self._mask_keys.public_bytes
        ):
            raise MaliciousServerDetected("the key directory does not hold the keys this client advertised", SERVER_ID)
        self._neighbours = graph_of(config, self._digest).neighbours(self.client_id)
        peers = {v: (adverts[v].cipher_public_key, adverts[v].mask_public_key) for v in self._neighbours & adverts.keys()}
        if len(peers) < config.threshold:
            raise NotEnoughSurvivors(
                f"only {len(peers)} neighbours advertised keys; the threshold is {config.threshold}"
            )
        self._peer_keys = peers
        self._self_seed = self._randbytes(SECRET_BYTES)
        holders = sorted(peers)
        shares = shamir.split(
            [self._mask_keys.private_bytes(), self._self_seed], threshold=config.threshold, holders=holders
        )
        # One holder's plaintext: its mask-key share then its self-seed share, raw (see _open_share).
        size = 2 * shamir.share_bytes(SECRET_BYTES)
        raw = shamir.encode_share(shares)
        ciphertexts = {}
        for index, holder in enumerate(holders):
            plaintext = raw[index * size:(index + 1) * size]
            if holder == self.client_id:
                self._held[self.client_id] = ShareBundle(
                    config.round_id, self.client_id, holder, plaintext[:size // 2], plaintext[size // 2:])
                continue
            ciphertexts[holder] = encrypt(self._share_key(holder), plaintext, self._share_ad(self.client_id, holder))
        commitment = seed_commitment(config.round_id, self.client_id, self._self_seed)
        return EncryptedShares(config.round_id, self.client_id, ciphertexts, commitment)

    def _on_shares(self, msg: ShareDelivery) -> MaskedInput:
        config = self._require_config()
        if msg.recipient != self.client_id:
            raise UnexpectedMessage("share delivery addressed to another client", SERVER_ID)
        for sender, blob in msg.ciphertexts.items():
            if sender not in self._peer_keys or sender == self.client_id:
                raise MaliciousServerDetected(f"share delivered from {sender}, who did not advertise keys", SERVER_ID)
            bundle = self._open_share(sender, blob)
            if bundle is None:
                # The sender (or the server) spoiled it: this client holds no share of the sender's
                # secrets and says so at unmask time; it still masks with the sender (the keys were
                # fine), so the round goes on with one share holder fewer for that sender.
                self._unusable.add(sender)
                continue
            self._held[sender] = bundle
        self._share_keys.clear()  # no share is encrypted or decrypted after this stage
        sharers = frozenset(msg.ciphertexts) | {self.client_id}
        if len(sharers) < config.threshold:
            raise NotEnoughSurvivors(f"only {len(sharers)} neighbours shared keys; the threshold is {config.threshold}")
        self._sharers = sharers
        if self._update is None:
            raise LocalProtocolError("no update to send: call set_update() before the masked-input stage")
        width = bytes_per_element(config.bits)
        sealed = wire.SealedBuffer(MaskedInput(config.round_id, self.client_id, b""), self.client_id, config.dim * width)
        if width == 4:  # residues are masked where they will be sent
            self._masked_update(out=sealed.tail.view("<u4"))
        else:
            sealed.tail[:] = np.frombuffer(pack_residues(self._masked_update(), config.bits), dtype=np.uint8)
        return sealed.seal(self._identity)

    def _on_consistency(self, msg: ConsistencyRequest) -> ConsistencySignature:
        config = self._require_config()
        survivors = frozenset(msg.survivors)
        if self.client_id not in survivors:
            raise MaliciousServerDetected("consistency check sent to a client not listed as a survivor", SERVER_ID)
        local = survivors & self._neighbours
        if not local <= self._sharers:
            raise MaliciousServerDetected(
                f"survivors {sorted(local - self._sharers)} never shared keys with this client", SERVER_ID
            )
        if len(local) < config.threshold:
            raise NotEnoughSurvivors(f"only {len(local)} neighbours survived; the threshold is {config.threshold}")
        if len(survivors) < self._policy.min_participants:
            raise MaliciousServerDetected(
                f"the sum would cover {len(survivors)} clients; this client requires at least "
                f"{self._policy.min_participants}", SERVER_ID,
            )
        self._signed_survivors = tuple(sorted(survivors))
        signature = self._identity.sign(consistency_payload(config.round_id, self._digest, self._signed_survivors))
        return ConsistencySignature(config.round_id, self.client_id, signature)

    def _on_unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        config = self._require_config()
        survivors, dropped = frozenset(msg.survivors), frozenset(msg.dropped)
        both = survivors & dropped
        if both:
            raise MaliciousServerDetected(
                f"server listed {sorted(both)} both as dropped and as surviving; refusing to reveal any share",
                SERVER_ID,
            )
        if tuple(sorted(survivors)) != self._signed_survivors:
            raise MaliciousServerDetected("survivor set differs from the one this client signed", SERVER_ID)
        expected_dropped = self._sharers - survivors
        if dropped & self._neighbours != expected_dropped:
            raise MaliciousServerDetected(
                "dropped list is not exactly the neighbours that shared keys but sent no input", SERVER_ID
            )
        payload = consistency_payload(config.round_id, self._digest, self._signed_survivors)
        valid = 0
        for signer, signature in msg.signatures.items():
            if signer not in survivors:
                raise MaliciousServerDetected(f"consistency signature from non-survivor {signer}", SERVER_ID)
            public_key = self._identities.get(signer)
            if public_key is None:
                raise MaliciousServerDetected(f"consistency signature from unknown party {signer}", SERVER_ID)
            try:
                verify_signature(public_key, signature, payload)
            except SecAggError:
                raise MaliciousServerDetected(
                    f"client {signer} signed a different survivor set: the server sent inconsistent views",
                    SERVER_ID,
                ) from None
            if signer in self._neighbours:
                valid += 1
        if valid < config.threshold:
            raise MaliciousServerDetected(
                f"only {valid} neighbours confirmed the survivor set; {config.threshold} are required", SERVER_ID
            )
        self_seed_shares = {v: self._held[v].self_seed_share for v in survivors & self._sharers if v in self._held}
        mask_key_shares = {v: self._held[v].mask_key_share for v in expected_dropped if v in self._held}
        unusable = tuple(sorted(self._unusable & self._sharers))
        # One-shot: forget every held share once answered.
        self._held.clear()
        self._self_seed = None
        return UnmaskResponse(config.round_id, self.client_id, self_seed_shares, mask_key_shares, unusable)

    _HANDLERS: dict[type, Callable] = {
        RoundConfig: _on_config,
        KeyDirectory: _on_directory,
        ShareDelivery: _on_shares,
        ConsistencyRequest: _on_consistency,
        UnmaskRequest: _on_unmask,
    }

    # -- helpers ------------------------------------------------------------------------

    def _masked_update(self, out: np.ndarray | None = None) -> np.ndarray:
        """The masked residues, in ``out`` (uint32, the round's dimension) when given.

        The update is encoded chunk by chunk inside the mask loop (``add_many``'s ``fill``):
        each chunk is encoded, then masked by every seed while it is in cache, so the
        encoding costs no pass of its own over the vector and shares the mask threads.
        """
        config = self._config
        codec = codec_of(config)
        noise = None if self._integer_noise is None else self._integer_noise(config.dim, codec.scale)
        encoding = codec.encoding(self._update, rounding_seed=self._rounding_seed, integer_noise=noise)
        masks = [(self._self_seed, 1)] + [
            (pairwise_seed(config.round_id, self._mask_keys.private, self.client_id, peer, self._peer_keys[peer][1]),
             pairwise_sign(self.client_id, peer))
            for peer in sorted(self._sharers - {self.client_id})
        ]
        value = np.empty(config.dim, dtype=np.uint32) if out is None else out
        acc = MaskAccumulator(config.dim, initial=value, copy=False, workers=self._workers)  # filled in place
        acc.add_many(masks, fill=encoding.writer)
        if config.bits < 32:
            np.bitwise_and(acc.value, np.uint32(codec.modulus - 1), out=acc.value)
        return acc.value

    def _open_share(self, sender: int, blob: bytes) -> ShareBundle | None:
        """The sender's share bundle for this client, or None if it does not decrypt or is malformed.

        The plaintext is the two shares, raw; the round, the sender and the recipient are
        the AES-GCM associated data (:meth:`_share_ad`), so a ciphertext made for another
        round or pair fails authentication here, as a copy of them inside the plaintext
        would have been refused (that copy, msgpack-framed, cost more than the rest of the
        share stage at N = 1,000).
        """
        size = shamir.share_bytes(SECRET_BYTES)
        try:
            plaintext = decrypt(self._share_key(sender), blob, self._share_ad(sender, self.client_id))
            if len(plaintext) != 2 * size:
                return None
            mask_key_share, self_seed_share = plaintext[:size], plaintext[size:]
            for share in (mask_key_share, self_seed_share):
                shamir.check_share(share, secret_bytes=SECRET_BYTES)
        except InvalidShare:
            return None
        return ShareBundle(self._config.round_id, sender, self.client_id, mask_key_share, self_seed_share)

    def _share_key(self, peer: int) -> bytes:
        """The key for shares exchanged with ``peer``, agreed once (used to encrypt, then to decrypt)."""
        key = self._share_keys.get(peer)
        if key is None:
            key = self._share_keys[peer] = agree(
                self._cipher_keys.private, self._peer_keys[peer][0],
                label=LABEL_SHARE_ENCRYPTION, context=pair_context(self._config.round_id, self.client_id, peer),
            )
        return key

    def _share_ad(self, sender: int, recipient: int) -> bytes:
        """Associated data of a share ciphertext: its format (two raw shares), round, sender, recipient."""
        return SHARE_AD_LABEL + self._config.round_id + sender.to_bytes(8, "big") + recipient.to_bytes(8, "big")

    def _require_config(self) -> RoundConfig:
        if self._config is None:
            raise LocalProtocolError("no round configuration received yet")
        return self._config

    def _identities_of_server(self, party: int) -> bytes | None:
        return self._identities.get(SERVER_ID) if party == SERVER_ID else None

    def _identities_of_client(self, party: int) -> bytes | None:
        return None if party == SERVER_ID else self._identities.get(party)

    def _abort(self, exc: BaseException) -> None:
        self.state = ClientState.ABORTED
        self.abort_reason = f"{type(exc).__name__}: {exc}"
        self._held.clear()
        self._share_keys.clear()
        self._self_seed = None
        self._mask_keys = None
