"""Server side of the masking protocol, as a sans-IO state machine.

The server relays keys and encrypted shares, sums masked inputs as they arrive (memory
O(d), not O(n d)), and at the end reconstructs exactly the secrets the protocol allows:
self-mask seeds of survivors and mask keys of clients that dropped after sharing.

Driving it: ``start()`` returns the sealed RoundConfig for every client; then, for each
stage, feed client messages to ``receive()`` and call ``close_stage()`` when every
expected client answered or the stage's deadline passed (the transport decides; the
session has no clock). ``close_stage()`` returns the sealed messages for the next stage.
After the unmask stage closes, ``result`` holds the decoded sum over ``included``.

A bad client message raises a typed error from ``receive()`` and changes nothing: the
client is recorded in ``rejected`` (its signed message kept in ``evidence``) and treated
as dropped at that stage. Adverts with an unusable X25519 key are refused here, before
they are relayed. Unmasking uses every share received: each reconstructed secret is
checked against its owner's commitment or advertised public key, and when one fails the
wrong shares are decoded around (Berlekamp-Welch, :func:`secagg.shamir.honest_holders`);
their holders are listed in ``suspects`` with the signed responses as evidence (a wrong
share proves that its holder or its dealer lied, not which). Only ``close_stage()`` can
fail the round, with :class:`NotEnoughSurvivors` when fewer than t clients remain or
:class:`InvalidShare` when too many shares of one secret are wrong; the failure is sticky.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from collections.abc import Set as AbstractSet

import numpy as np

from secagg import shamir, wire
from secagg.encoding import sum_in_result_buffer
from secagg.errors import (
    InvalidPublicKey,
    InvalidShare,
    LocalProtocolError,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
    SecAggError,
    SessionAborted,
    UnexpectedMessage,
)
from secagg.graph import Graph
from secagg.keys import IdentityKey, KeyPair, check_public_key, verify_signature
from secagg.prg import MaskAccumulator, check_workers
from secagg.protocol.common import (
    SECRET_BYTES,
    SERVER_ID,
    Stage,
    codec_of,
    graph_of,
    pairwise_seed,
    pairwise_sign,
    round_digest,
    seed_commitment,
    unpack_residues,
)
from secagg.protocol.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    consistency_payload,
)


class ServerState(enum.Enum):
    COLLECTING = "collecting"
    DONE = "done"
    FAILED = "failed"


EXPECTED_MESSAGE: dict[Stage, type] = {
    Stage.ADVERTISE: AdvertiseKeys,
    Stage.SHARE: EncryptedShares,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.CONSISTENCY: ConsistencySignature,
    Stage.UNMASK: UnmaskResponse,
}
NEXT_STAGE: dict[Stage, Stage | None] = {
    Stage.ADVERTISE: Stage.SHARE,
    Stage.SHARE: Stage.MASKED_INPUT,
    Stage.MASKED_INPUT: Stage.CONSISTENCY,
    Stage.CONSISTENCY: Stage.UNMASK,
    Stage.UNMASK: None,
}


class ServerSession:
    """The server's part in one round."""

    def __init__(self, config: RoundConfig, identity: IdentityKey, identities: Mapping[int, bytes], *,
                 workers: int = 1) -> None:
        """``workers``: threads that regenerate the masks at unmasking (1: serial, the default);
        the sum is bit-identical whatever the count (see :class:`secagg.prg.MaskAccumulator`)."""
        self.config = config
        self._identity = identity
        self._workers = check_workers(workers)
        self._identities = dict(identities)
        missing = [c for c in config.clients if c not in self._identities]
        if missing:
            raise LocalProtocolError(f"no identity key registered for clients {missing}")
        self._clients = frozenset(config.clients)
        self._graph: Graph | None = None  # fixed once every advert is in (its seed hashes them)
        self._digest = b""
        self._codec = codec_of(config)
        self.stage: Stage | None = None
        self.state = ServerState.COLLECTING
        self.failure: str | None = None
        self.rejected: dict[int, str] = {}
        self.evidence: dict[int, bytes] = {}  # rejected client -> its signed message that shows the fault
        self.suspects: dict[int, str] = {}  # holders of shares that did not fit their dealer's secret
        self.disputes: dict[int, tuple[int, ...]] = {}  # holder -> dealers whose share it reports unusable
        self.timings: dict[str, float] = {}
        self.result: np.ndarray | None = None
        self.included: tuple[int, ...] = ()
        self.dropped_at: dict[str, tuple[int, ...]] = {}
        self.received_bytes: dict[int, int] = {}
        # Stage data.
        self._adverts: dict[int, bytes] = {}
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shares: dict[int, EncryptedShares] = {}
        # The running sum lives in the upper half of the float64 result it decodes into.
        self._result, self._sum = sum_in_result_buffer(config.dim)
        self._masked_from: set[int] = set()
        self._signatures: dict[int, bytes] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._response_bytes: dict[int, bytes] = {}
        # responder -> field -> (owners, shares[owner, limb]): decoded once, on receipt
        self._decoded: dict[int, dict[str, tuple[tuple[int, ...], np.ndarray]]] = {}
        self._u1: frozenset[int] = frozenset()
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._u4: frozenset[int] = frozenset()

    @property
    def graph(self) -> Graph | None:
        """The round's graph, known once the advertise stage closed (its seed hashes the adverts)."""
        return self._graph

    # -- driving ------------------------------------------------------------------------

    def start(self) -> dict[int, bytes]:
        if self.stage is not None:
            raise LocalProtocolError("round already started")
        self.stage = Stage.ADVERTISE
        return {c: self._seal(self.config) for c in self.config.clients}

    def expected(self) -> frozenset[int]:
        """Clients whose message the current stage still waits for."""
        if self.stage is None or self.state is not ServerState.COLLECTING:
            return frozenset()
        return self._eligible() - self._answered() - self.rejected.keys()

    def receive(self, data: bytes) -> int:
        """Take one sealed client message; return the sender id. Errors leave state unchanged."""
        if self.state is not ServerState.COLLECTING or self.stage is None:
            raise SessionAborted(f"round is {self.state.value}; no more messages are accepted")
        sender, msg = wire.open_sealed(data, self._client_key, max_bytes=self._max_bytes())
        if sender in self.rejected:
            raise RemoteProtocolError(f"client {sender} was already rejected this round", sender)
        try:
            self._accept(sender, msg)
        except (ReplayError, UnexpectedMessage):
            raise  # late, duplicated or out-of-stage: ignored, the client is not banned for it
        except SecAggError as exc:
            self.rejected[sender] = f"{self.stage.value}: {type(exc).__name__}: {exc}"
            self.evidence[sender] = bytes(data)
            raise
        if type(msg) is AdvertiseKeys:
            self._adverts[sender] = bytes(data)  # relayed verbatim so peers verify the signature
        elif type(msg) is UnmaskResponse:
            self._response_bytes[sender] = bytes(data)  # signed: the evidence if a share proves wrong
        self.received_bytes[sender] = self.received_bytes.get(sender, 0) + len(data)
        return sender

    def close_stage(self) -> dict[int, bytes]:
        """End the current stage; return the sealed messages of the next one (by client)."""
        if self.state is not ServerState.COLLECTING or self.stage is None:
            raise SessionAborted(f"round is {self.state.value}")
        stage = self.stage
        started = time.perf_counter()
        try:
            outgoing = self._CLOSERS[stage](self)
        except SecAggError as exc:
            self.state = ServerState.FAILED
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        self.timings[f"server.{stage.value}"] = self.timings.get(f"server.{stage.value}", 0.0) + (
            time.perf_counter() - started
        )
        self.stage = NEXT_STAGE[stage]
        if self.stage is None:
            self.state = ServerState.DONE
        return outgoing

    # -- receiving ----------------------------------------------------------------------

    def _accept(self, sender: int, msg: wire.Message) -> None:
        expected_type = EXPECTED_MESSAGE[self.stage]
        if type(msg) is not expected_type:
            raise UnexpectedMessage(
                f"stage {self.stage.value} expects {expected_type.TYPE}, client {sender} sent {type(msg).TYPE} "
                "(late, replayed or out of order)", sender,
            )
        if msg.round_id != self.config.round_id:
            raise ReplayError(f"client {sender} sent a message of another round")
        if msg.client != sender:
            raise RemoteProtocolError(f"client {sender} signed a message claiming to be from {msg.client}", sender)
        if sender in self._answered():
            raise ReplayError(f"client {sender} already answered stage {self.stage.value}")
        if sender not in self._eligible():  # rejected senders were turned away in receive()
            raise UnexpectedMessage(f"client {sender} is not part of stage {self.stage.value}", sender)
        self._RECEIVERS[type(msg)](self, sender, msg)

    def _eligible(self) -> frozenset[int]:
        """Clients allowed to answer the current stage: those that answered the previous one."""
        return {
            Stage.ADVERTISE: self._clients,
            Stage.SHARE: self._u1,
            Stage.MASKED_INPUT: self._u2,
            Stage.CONSISTENCY: self._u3,
            Stage.UNMASK: self._u4,
        }[self.stage]

    def _answered(self) -> AbstractSet[int]:
        """Clients that answered the current stage (a live view, not a copy)."""
        return {
            Stage.ADVERTISE: self._keys.keys(),
            Stage.SHARE: self._shares.keys(),
            Stage.MASKED_INPUT: self._masked_from,
            Stage.CONSISTENCY: self._signatures.keys(),
            Stage.UNMASK: self._responses.keys(),
        }[self.stage]

    def _on_advertise(self, sender: int, msg: AdvertiseKeys) -> None:
        try:
            check_public_key(msg.cipher_public_key)
            check_public_key(msg.mask_public_key)
        except InvalidPublicKey:
            raise RemoteProtocolError(f"client {sender} advertised an unusable (low-order) X25519 key", sender) from None
        self._keys[sender] = msg

    def _on_shares(self, sender: int, msg: EncryptedShares) -> None:
        wanted = (self._graph.neighbours(sender) & self._u1) - {sender}
        if set(msg.ciphertexts) != wanted:
            raise RemoteProtocolError(
                f"client {sender} sent shares to {sorted(msg.ciphertexts)}, expected exactly its neighbours "
                f"that advertised keys", sender,
            )
        if len(msg.commitment) != 32:
            raise RemoteProtocolError(f"client {sender} sent a malformed self-seed commitment", sender)
        self._shares[sender] = msg

    def _on_masked(self, sender: int, msg: MaskedInput) -> None:
        started = time.perf_counter()
        vector = unpack_residues(msg.vector, self.config.dim, self.config.bits)
        np.add(self._sum, vector, out=self._sum)
        self._masked_from.add(sender)
        self.timings["server.collect"] = self.timings.get("server.collect", 0.0) + time.perf_counter() - started

    def _on_signature(self, sender: int, msg: ConsistencySignature) -> None:
        try:
            verify_signature(
                self._identities[sender], msg.signature,
                consistency_payload(self.config.round_id, self._digest, tuple(self._u3)),
            )
        except SecAggError:
            raise RemoteProtocolError(f"client {sender} signed a different survivor set", sender) from None
        self._signatures[sender] = msg.signature

    def _on_unmask(self, sender: int, msg: UnmaskResponse) -> None:
        sharers = self._sharers_of(sender) - {sender}
        unusable = set(msg.unusable)
        want_seeds = (sharers & self._u3) | ({sender} & self._u3)
        want_keys = sharers - self._u3
        if (set(msg.self_seed_shares) | (unusable & want_seeds) != want_seeds
                or set(msg.mask_key_shares) | (unusable & want_keys) != want_keys
                or not unusable <= sharers):
            raise RemoteProtocolError(f"client {sender} revealed a different set of shares than requested", sender)
        try:
            decoded = {
                field: (tuple(shares), shamir.decode_shares(list(shares.values()), secret_bytes=SECRET_BYTES))
                for field, shares in (("self_seed_shares", msg.self_seed_shares), ("mask_key_shares", msg.mask_key_shares))
            }
        except InvalidShare:
            raise RemoteProtocolError(f"client {sender} sent a share of the wrong size or outside the field", sender) from None
        if unusable:
            self.disputes[sender] = tuple(sorted(unusable))
        self._decoded[sender] = decoded
        self._responses[sender] = msg

    _RECEIVERS = {
        AdvertiseKeys: _on_advertise,
        EncryptedShares: _on_shares,
        MaskedInput: _on_masked,
        ConsistencySignature: _on_signature,
        UnmaskResponse: _on_unmask,
    }

    # -- closing stages -----------------------------------------------------------------

    def _close_advertise(self) -> dict[int, bytes]:
        self._u1 = frozenset(self._keys)
        self._record_dropped(Stage.ADVERTISE, self._clients - self._u1)
        self._require(self._u1, "advertised keys")
        self._digest = round_digest(self.config.round_id, self._keys)
        self._graph = graph_of(self.config, self._digest)
        directory = self._seal(KeyDirectory(self.config.round_id, {v: self._adverts[v] for v in self._u1}))
        return {u: directory for u in self._u1}

    def _close_share(self) -> dict[int, bytes]:
        self._u2 = frozenset(self._shares)
        self._record_dropped(Stage.SHARE, self._u1 - self._u2)
        self._require(self._u2, "shared keys")
        out = {}
        for u in self._u2:
            delivered = {v: self._shares[v].ciphertexts[u] for v in (self._graph.neighbours(u) & self._u2) - {u}}
            out[u] = self._seal(ShareDelivery(self.config.round_id, u, delivered))
        return out

    def _close_masked(self) -> dict[int, bytes]:
        self._u3 = frozenset(self._masked_from)
        self._record_dropped(Stage.MASKED_INPUT, self._u2 - self._u3)
        self._require(self._u3, "sent masked inputs")
        request = self._seal(ConsistencyRequest(self.config.round_id, tuple(sorted(self._u3))))
        return {u: request for u in self._u3}

    def _close_consistency(self) -> dict[int, bytes]:
        self._u4 = frozenset(self._signatures)
        self._record_dropped(Stage.CONSISTENCY, self._u3 - self._u4)
        self._require(self._u4, "confirmed the survivor set")
        survivors = tuple(sorted(self._u3))
        dropped = self._u2 - self._u3
        out = {}
        for u in self._u4:
            near = self._graph.neighbours(u)
            signatures = {v: self._signatures[v] for v in self._u4 & near}
            out[u] = self._seal(UnmaskRequest(self.config.round_id, survivors, tuple(sorted(dropped & near)), signatures))
        return out

    def _close_unmask(self) -> dict[int, bytes]:
        responders = frozenset(self._responses)
        self._record_dropped(Stage.UNMASK, self._u4 - responders)
        started = time.perf_counter()
        seeds = self._reconstruct(self._u3, "self_seed_shares", self._seed_is_committed)
        dropped = self._u2 - self._u3
        mask_keys = self._reconstruct(dropped, "mask_key_shares", self._key_is_advertised)
        self.timings["server.reconstruct"] = time.perf_counter() - started
        started = time.perf_counter()
        # Every secret is recovered and checked by now: masks come off the sum in place.
        masks = [(seed, -1) for seed in seeds.values()]
        for owner, secret in mask_keys.items():
            keys = KeyPair.from_private_bytes(secret)
            for peer in sorted(self._graph.neighbours(owner) & self._u3):
                seed = pairwise_seed(self.config.round_id, keys.private, owner, peer, self._keys[peer].mask_public_key)
                masks.append((seed, -pairwise_sign(peer, owner)))  # peer added sign(peer, owner) * PRG(seed)
        acc = MaskAccumulator(self.config.dim, initial=self._sum, copy=False, workers=self._workers)
        acc.add_many(masks)
        residues = np.bitwise_and(acc.value, np.uint32(self._codec.modulus - 1), out=acc.value)
        self.timings["server.remove_masks"] = time.perf_counter() - started
        self.result = self._codec.decode_sum(residues, out=self._result)
        self.included = tuple(sorted(self._u3))
        return {}

    _CLOSERS = {
        Stage.ADVERTISE: _close_advertise,
        Stage.SHARE: _close_share,
        Stage.MASKED_INPUT: _close_masked,
        Stage.CONSISTENCY: _close_consistency,
        Stage.UNMASK: _close_unmask,
    }

    # -- helpers ------------------------------------------------------------------------

    def _reconstruct(self, owners: frozenset[int], field: str, valid) -> dict[int, bytes]:
        """Recover one secret per owner from every share received, decoding around wrong ones.

        Fast path: owners whose first t share holders coincide are interpolated together in
        one vectorised pass (one Lagrange weight vector per holder set, the sets' weights
        computed in batches: on a sparse graph every owner has its own set). Each secret is then
        checked with ``valid(owner, secret)``; for the few that fail, Berlekamp-Welch over
        all their shares finds the holders whose shares fit the polynomial.
        """
        t = self.config.threshold
        holders_of: dict[int, list[int]] = {}
        by_holders: dict[tuple[int, ...], list[int]] = {}
        for owner in sorted(owners):
            candidates = self._graph.neighbours(owner).intersection(self._responses)
            holders = sorted(r for r in candidates if owner in getattr(self._responses[r], field))
            if len(holders) < t:
                raise NotEnoughSurvivors(
                    f"only {len(holders)} clients returned shares for client {owner}; {t} are needed"
                )
            holders_of[owner] = holders
            by_holders.setdefault(tuple(holders[:t]), []).append(owner)
        secrets: dict[int, bytes] = {}
        failed: list[int] = []
        table, row, column = self._share_table(field, owners)
        for (holders, group), weights in zip(by_holders.items(), shamir.lagrange_at_zero_many(list(by_holders))):
            shares = table[np.ix_([row[h] for h in holders], [column[o] for o in group])]
            limbs = shamir.interpolate_at_zero(holders, shares, secret_bytes=SECRET_BYTES, weights=weights)
            for owner, secret in zip(group, shamir.secrets_from_limbs(limbs, SECRET_BYTES)):
                if secret is not None and valid(owner, secret):
                    secrets[owner] = secret
                else:
                    failed.append(owner)
        for owner in failed:
            holders = holders_of[owner]
            shares = table[[row[h] for h in holders], column[owner], :]
            secrets[owner] = self._decode_around(owner, holders, shares, field, valid)
        return secrets

    def _decode_around(self, owner: int, holders: list[int], shares: np.ndarray, field: str, valid) -> bytes:
        """The owner's secret from ``shares[holder, limb]`` although some are wrong (see shamir.honest_holders)."""
        t = self.config.threshold
        for _ in range(3):  # a wrong share hides in the random limb combination with probability 1/p
            decoded = shamir.honest_holders(holders, shares, t)
            if decoded is None:
                break
            good, wrong = decoded
            index = {h: i for i, h in enumerate(holders)}
            chosen = good[:t]
            limbs = shamir.interpolate_at_zero(
                chosen, shares[[index[h] for h in chosen]][:, None, :], secret_bytes=SECRET_BYTES
            )
            secret = shamir.secrets_from_limbs(limbs, SECRET_BYTES)[0]
            if secret is not None and valid(owner, secret):
                for h in wrong:
                    self.suspects[h] = (
                        f"its share of client {owner}'s {field.replace('_', ' ')[:-1]} is off the polynomial "
                        f"the other shares and the commitment agree on (it or client {owner} lied)"
                    )
                    self.evidence.setdefault(h, self._response_bytes[h])
                return secret
        raise InvalidShare(
            f"the shares returned for client {owner} do not reconstruct its committed secret: more than "
            f"(shares - t) / 2 = {(len(holders) - t) // 2} of the {len(holders)} shares are wrong, or client "
            f"{owner} dealt inconsistent shares. The round is abandoned; nothing was unmasked."
        )

    def _share_table(self, field: str, owners: frozenset[int]):
        """shares[responder, owner, limb] for ``field`` (zero where none) and the row / column of each id.

        Built once per field from the arrays decoded on receipt (one vectorised assignment
        per responder); every reconstruction is then a fancy-index gather.
        """
        column = {o: i for i, o in enumerate(sorted(owners))}
        row = {h: i for i, h in enumerate(sorted(self._decoded))}
        table = np.zeros((len(row), len(column), shamir.limbs_for(SECRET_BYTES)), dtype=np.uint32)
        for holder, fields in self._decoded.items():
            held, shares = fields[field]
            wanted = [i for i, o in enumerate(held) if o in column]
            if wanted:
                table[row[holder], [column[held[i]] for i in wanted]] = shares[wanted]
        return table, row, column

    def _seed_is_committed(self, owner: int, seed: bytes) -> bool:
        return seed_commitment(self.config.round_id, owner, seed) == self._shares[owner].commitment

    def _key_is_advertised(self, owner: int, secret: bytes) -> bool:
        return KeyPair.from_private_bytes(secret).public_bytes == self._keys[owner].mask_public_key

    def _sharers_of(self, client: int) -> frozenset[int]:
        return self._graph.neighbours(client) & self._u2

    def _require(self, survivors: frozenset[int], what: str) -> None:
        if len(survivors) < self.config.threshold:
            raise NotEnoughSurvivors(
                f"only {len(survivors)} clients {what}; the threshold is {self.config.threshold}. "
                "The round is abandoned; nothing was unmasked."
            )

    def _record_dropped(self, stage: Stage, clients: frozenset[int]) -> None:
        self.dropped_at[stage.value] = tuple(sorted(clients))

    def _max_bytes(self) -> int:
        vector = self.config.dim * ((self.config.bits + 7) // 8)
        return vector + 4096 + 256 * len(self.config.clients)

    def _client_key(self, party: int) -> bytes | None:
        return None if party == SERVER_ID else self._identities.get(party)

    def _seal(self, msg: wire.Message) -> bytes:
        return wire.seal(msg, SERVER_ID, self._identity)
