"""Typed messages of the masking protocol (one frozen dataclass per protocol step).

Every message carries the round id; client messages carry the sender id, which must
match the id that signed the envelope. Invariants are checked when a message is built,
both locally and when decoded from the wire, so an ill-formed message never reaches a
state machine. Field meanings never change; new meanings get new types (see wire.py).
"""

from __future__ import annotations

from secagg.wire import Message, message

ROUND_ID_BYTES = 16
MAX_PARTIES = 1 << 20
MAX_DIM = 1 << 28  # the most parameters a round may have (a client's default policy limit)


def _check_round(round_id: bytes) -> None:
    if len(round_id) != ROUND_ID_BYTES:
        raise ValueError(f"round_id must be {ROUND_ID_BYTES} bytes")


def _check_ids(ids: tuple[int, ...], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} contains duplicate client ids")
    if any(not 1 <= i < MAX_PARTIES for i in ids):
        raise ValueError(f"{what} contains an id outside 1..{MAX_PARTIES - 1}")


@message
class RoundConfig(Message):
    """Server -> every client: the public parameters of one round."""

    TYPE = "masking.round_config.v2"  # v2: no graph seed; it is derived from the signed adverts
    round_id: bytes
    clients: tuple[int, ...]
    threshold: int
    degree: int
    dim: int
    bits: int
    clip: float
    scale: float
    clip_mode: str
    headroom: float

    def __post_init__(self) -> None:
        _check_round(self.round_id)
        _check_ids(self.clients, "clients")
        if not 1 <= self.threshold <= len(self.clients):
            raise ValueError("threshold must be between 1 and the number of clients")
        if self.degree < 1:
            raise ValueError("degree must be positive")
        if self.dim < 1:
            raise ValueError("dim must be positive")


@message
class AdvertiseKeys(Message):
    """Client -> server, relayed verbatim (still signed) to the client's neighbours."""

    TYPE = "masking.advertise_keys"
    FIELD_LIMITS = {"cipher_public_key": 32, "mask_public_key": 32}
    round_id: bytes
    client: int
    cipher_public_key: bytes
    mask_public_key: bytes

    def __post_init__(self) -> None:
        _check_round(self.round_id)
        if len(self.cipher_public_key) != 32 or len(self.mask_public_key) != 32:
            raise ValueError("X25519 public keys are 32 bytes")
        if self.cipher_public_key == self.mask_public_key:
            raise ValueError("the two public keys must differ")


@message
class KeyDirectory(Message):
    """Server -> every client: the sealed AdvertiseKeys of every client that advertised.

    Every client needs all of them: the graph seed is a hash of all adverts
    (:func:`secagg.protocol.common.round_digest`), and each client recomputes it.
    """

    TYPE = "masking.key_directory.v2"  # v2: one directory for all, with every advert
    FIELD_LIMITS = {"adverts": 512}
    round_id: bytes
    adverts: dict[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round_id)


@message
class ShareBundle(Message):
    """The shares of one sender's secrets that one recipient holds (kept in client snapshots).

    Between the two they travel as their two shares, raw, inside AES-GCM with the round,
    sender and recipient as associated data (see ``ClientSession._open_share``)."""

    TYPE = "masking.share_bundle"
    FIELD_LIMITS = {"mask_key_share": 64, "self_seed_share": 64}
    round_id: bytes
    sender: int
    recipient: int
    mask_key_share: bytes
    self_seed_share: bytes


@message
class EncryptedShares(Message):
    """Client -> server: one encrypted ShareBundle per neighbour."""

    TYPE = "masking.encrypted_shares"
    FIELD_LIMITS = {"ciphertexts": 512, "commitment": 32}
    round_id: bytes
    client: int
    ciphertexts: dict[int, bytes]
    commitment: bytes  # SHA-256 of the self-mask seed, checked after reconstruction

    def __post_init__(self) -> None:
        _check_round(self.round_id)
        if self.client in self.ciphertexts:
            raise ValueError("a client does not send a share to itself through the server")


@message
class ShareDelivery(Message):
    """Server -> client: the ciphertexts addressed to it, by sender."""

    TYPE = "masking.share_delivery"
    FIELD_LIMITS = {"ciphertexts": 512}
    round_id: bytes
    recipient: int
    ciphertexts: dict[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round_id)


@message
class MaskedInput(Message):
    """Client -> server: the masked, encoded update (packed little-endian residues)."""

    TYPE = "masking.masked_input"
    # A whole update up to MAX_DIM 4-byte residues (a BERT-base update is 440 MB); the
    # server bounds each message by its own round's dimension before parsing it.
    FIELD_LIMITS = {"vector": 4 * MAX_DIM}
    # Decoded as a read-only view of the received message (no copy of a 440 MB vector),
    # and written in place by the client (wire.SealedBuffer); so it stays the last field.
    BORROWED_FIELDS = frozenset({"vector"})
    round_id: bytes
    client: int
    vector: bytes

    def __post_init__(self) -> None:
        _check_round(self.round_id)


@message
class ConsistencyRequest(Message):
    """Server -> surviving clients: the set of clients whose masked input was received."""

    TYPE = "masking.consistency_request"
    round_id: bytes
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_round(self.round_id)
        _check_ids(self.survivors, "survivors")


@message
class ConsistencySignature(Message):
    """Client -> server: the client's signature over (round, survivor set)."""

    TYPE = "masking.consistency_signature"
    FIELD_LIMITS = {"signature": 64}
    round_id: bytes
    client: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_round(self.round_id)


@message
class UnmaskRequest(Message):
    """Server -> clients: reveal self-seed shares of survivors, mask-key shares of the dropped."""

    TYPE = "masking.unmask_request"
    FIELD_LIMITS = {"signatures": 64}
    round_id: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: dict[int, bytes]

    def __post_init__(self) -> None:
        _check_round(self.round_id)
        _check_ids(self.survivors, "survivors")
        _check_ids(self.dropped, "dropped")


@message
class UnmaskResponse(Message):
    """Client -> server: the requested shares, each for exactly one purpose."""

    TYPE = "masking.unmask_response.v2"  # v2: `unusable`
    FIELD_LIMITS = {"self_seed_shares": 64, "mask_key_shares": 64}
    round_id: bytes
    client: int
    self_seed_shares: dict[int, bytes]
    mask_key_shares: dict[int, bytes]
    # Neighbours whose encrypted share this client could not decrypt or decode: it holds no
    # share of theirs. The neighbour's signed EncryptedShares, kept by the server, is the evidence.
    unusable: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_round(self.round_id)
        both = set(self.self_seed_shares) & set(self.mask_key_shares)
        if both:
            raise ValueError(f"clients {sorted(both)} have both kinds of share revealed")
        _check_ids(self.unusable, "unusable")
        if set(self.unusable) & (set(self.self_seed_shares) | set(self.mask_key_shares)):
            raise ValueError("a share is both revealed and reported unusable")


def consistency_payload(round_id: bytes, digest: bytes, survivors: tuple[int, ...]) -> bytes:
    """What every survivor signs: the round, the digest of its signed adverts, the sorted survivor set.

    The digest covers every client's fresh keys, so a signature made in one round never
    verifies in another, even one that reuses the round id.
    """
    ordered = sorted(survivors)
    return b"secagg/v2/consistency|" + round_id + digest + b"".join(i.to_bytes(4, "big") for i in ordered)
