"""Wire messages of the ``ckks`` protection mode (see :mod:`secagg.wire` for the framing).

Every message is authenticated by its sender's Ed25519 identity before any TenSEAL code
runs, so a flipped bit anywhere, a truncation or another sender's key is caught first.
Contexts travel sealed (:func:`secagg.wire.seal`). Uploads and aggregates are megabytes,
and Ed25519 hashes what it signs twice with SHA-512, so they are hash-then-sign: a small
sealed *header* carries a BLAKE2b-256 digest of the ciphertext chunks, and the outer
(unsigned, schema-checked) message carries the header and the chunks. The receiver checks
the signature on the header, then the digest over the chunks, then their structure.

Ciphertexts are TenSEAL's own ``serialize()`` bytes, one TenSEAL vector (= one SEAL
ciphertext) per chunk of ``params.slots`` values; the number of chunks and the values in
each are derived from the round's declared dimension, never read from the message. ``fingerprint`` is SHA-256 over the public context (public key included),
so a ciphertext made under another key, or a context from another key holder, is refused
instead of decrypting to silent garbage.

Compatibility rule (as in :mod:`secagg.wire`): the meaning of a field never changes; a new
field or meaning is a new ``TYPE``.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

from secagg.ckks.params import HeParams
from secagg.wire import DEFAULT_MAX_BYTES, Message, message

MAX_CONTEXT_BYTES = 64 * 1024 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # per chunk; the real bound is set per round (tenseal_format)
FINGERPRINT_BYTES = 32
DIGEST_BYTES = 32
AUDIENCES = ("clients", "server")


@message
class HeContext(Message):
    """Key holder -> clients (public key, no secret key) or -> server (parameters only)."""

    TYPE: ClassVar[str] = "ckks.context"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {
        "round_id": 64, "context": MAX_CONTEXT_BYTES, "fingerprint": FINGERPRINT_BYTES,
    }

    round_id: bytes
    audience: str
    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    plain_modulus_bits: int
    context: bytes
    fingerprint: bytes

    def __post_init__(self) -> None:
        if self.audience not in AUDIENCES:
            raise ValueError(f"audience must be one of {AUDIENCES}")
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError("fingerprint must be 32 bytes")
        _ = self.params  # validates the parameter set (ConfigError is a ValueError)

    @property
    def params(self) -> HeParams:
        return HeParams(
            self.scheme, self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits,
            self.plain_modulus_bits,
        )


@message
class HeUploadHeader(Message):
    """Client -> server, sealed by the client: what the chunks are and their digest."""

    TYPE: ClassVar[str] = "ckks.upload_header"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {
        "round_id": 64, "fingerprint": FINGERPRINT_BYTES, "digest": DIGEST_BYTES,
    }

    round_id: bytes
    client_id: int
    fingerprint: bytes
    dim: int
    weighted: bool
    n_chunks: int
    digest: bytes


@message
class HeAggregateHeader(Message):
    """Server -> key holder, sealed by the server: the sum's shape, who is in it, its digest."""

    TYPE: ClassVar[str] = "ckks.aggregate_header"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {
        "round_id": 64, "fingerprint": FINGERPRINT_BYTES, "digest": DIGEST_BYTES,
    }

    round_id: bytes
    fingerprint: bytes
    dim: int
    weighted: bool
    included: tuple[int, ...]
    n_chunks: int
    digest: bytes

    def __post_init__(self) -> None:
        if len(set(self.included)) != len(self.included):
            raise ValueError("included lists a client twice")


@message
class HeCiphertexts(Message):
    """The envelope for an upload or an aggregate: a sealed header and the TenSEAL chunks."""

    TYPE: ClassVar[str] = "ckks.ciphertexts"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"header": 64 * 1024, "chunks": MAX_CHUNK_BYTES}

    header: bytes
    chunks: tuple[bytes, ...]


def chunks_digest(label: bytes, chunks: tuple[bytes, ...] | list[bytes]) -> bytes:
    """BLAKE2b-256 over length-prefixed chunks, domain-separated by ``label``."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"secagg-ckks-v1")
    h.update(label)
    h.update(len(chunks).to_bytes(8, "big"))
    for c in chunks:
        h.update(len(c).to_bytes(8, "big"))
        h.update(c)
    return h.digest()


# --------------------------------------------------------------------------- one round's stage messages


@message
class CkksDirectory(Message):
    """Server -> every participant: the round's parameters (to rebuild the same HeRoundConfig),
    the key holder's client id, and the CA-signed certificates of the server and of every
    participant (clients check them; the key holder checks each upload against them)."""

    TYPE: ClassVar[str] = "transport.ckks.directory.v2"
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


@message
class CkksContextRequest(Message):
    """Server -> key holder: generate this round's keys."""

    TYPE: ClassVar[str] = "transport.ckks.context_request"

    round: int


@message
class CkksContexts(Message):
    """Key holder -> server (sealed by the key holder's id): both sealed contexts."""

    TYPE: ClassVar[str] = "transport.ckks.contexts"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"for_clients": MAX_CONTEXT_BYTES, "for_server": MAX_CONTEXT_BYTES}

    round: int
    for_clients: bytes
    for_server: bytes


@message
class CkksDecryptRequest(Message):
    """Server -> key holder: batch ``index`` of ``count`` of the signed uploads the aggregate adds.

    The uploads of a round together can exceed any one message (200 clients x d=1e5 is
    about 660 MB), so the server forwards them in batches of bounded size, one stage each.
    Batch 0 also carries the sealed aggregate (later batches: empty); the key holder checks
    it first, then every batch's uploads as they come (:class:`~secagg.ckks.roles.SumCheck`),
    acknowledges every batch but the last with a :class:`CkksBatchReceived`, and answers the
    last with its release.
    """

    TYPE: ClassVar[str] = "ckks.decrypt_request.v2"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"aggregate": DEFAULT_MAX_BYTES, "uploads": DEFAULT_MAX_BYTES}

    round: int
    index: int
    count: int
    aggregate: bytes
    uploads: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"batch index {self.index} is outside 0..{self.count - 1}")
        if bool(self.aggregate) != (self.index == 0):
            raise ValueError("the first batch, and only the first, carries the aggregate")


@message
class CkksBatchReceived(Message):
    """Key holder -> server (sealed): batch ``index`` was checked; ``checked`` uploads so far."""

    TYPE: ClassVar[str] = "ckks.batch_received"

    round: int
    index: int
    checked: int


@message
class CkksRelease(Message):
    """Key holder -> server (sealed): the decrypted sum, the parties it covers and, in a
    weighted round, the decrypted sum of their weight fractions (0.0 when unweighted)."""

    TYPE: ClassVar[str] = "transport.ckks.release.v2"

    round: int
    values: bytes  # little-endian float64
    included: tuple[int, ...]  # party indices
    weight_sum: float


@message
class CkksPublicContexts(Message):
    """Server -> clients of a split round: every key holder's sealed public context, in order."""

    TYPE: ClassVar[str] = "ckks.public_contexts"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"contexts": MAX_CONTEXT_BYTES}

    round: int
    contexts: tuple[bytes, ...]


@message
class CkksSplitUpload(Message):
    """Client -> server in a split round: one signed upload per key holder, in order."""

    TYPE: ClassVar[str] = "ckks.split_upload"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"uploads": DEFAULT_MAX_BYTES}

    round: int
    uploads: tuple[bytes, ...]


@message
class CkksShareRelease(Message):
    """Key holder -> server in a split round (sealed): its decrypted sum of shares, uniform
    modulo t on its own; the server combines every key holder's share."""

    TYPE: ClassVar[str] = "ckks.share_release"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"fingerprint": FINGERPRINT_BYTES}

    round: int
    values: bytes  # little-endian int64 residues
    included: tuple[int, ...]  # party indices
    fingerprint: bytes


@message
class CkksClientSnapshot(Message):
    """A client session's state between two messages (local storage only, never sent).

    For hosts that keep no Python object between the messages of a round (a Flower
    SuperNode). A key holder's snapshot holds the round's *secret key* (``secret_context``)
    and its check of the aggregate so far (``check_*``: the aggregate's client list and
    chunks, the senders checked, the running sum); keep it where the live session would
    be. Empty fields: no key holder, or no check in progress.
    """

    TYPE: ClassVar[str] = "ckks.client_snapshot"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {
        "round_id": 64, "secret_context": MAX_CONTEXT_BYTES, "public_context": MAX_CONTEXT_BYTES,
        "check_chunks": MAX_CHUNK_BYTES, "check_total": MAX_CHUNK_BYTES,
    }

    round_id: bytes
    client_id: int
    stage: str
    failure: str
    keyholder_stage: str
    secret_context: bytes
    public_context: bytes
    used: bool
    batches: int
    batches_checked: int
    checking: bool
    check_included: tuple[int, ...]
    check_chunks: tuple[bytes, ...]
    check_senders: tuple[int, ...]
    check_total: tuple[bytes, ...]
