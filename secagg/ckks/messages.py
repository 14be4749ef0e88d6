"""Wire messages of the ``ckks`` protection mode (see :mod:`secagg.wire` for the framing).

Every message travels sealed (Ed25519 signature of its sender over the whole payload),
so a flipped bit anywhere, a truncation or another sender's key is caught before any
TenSEAL code runs. Ciphertexts are TenSEAL's own ``serialize()`` bytes, one TenSEAL
vector (= one SEAL ciphertext) per chunk of ``params.slots`` values; the number of chunks
and the values in each are derived from the round's declared dimension, never read from
the message. ``fingerprint`` is SHA-256 over the public context (public key included),
so a ciphertext made under another key, or a context from another key holder, is refused
instead of decrypting to silent garbage.
"""

from __future__ import annotations

from typing import ClassVar

from secagg.ckks.params import HeParams
from secagg.wire import Message, message

MAX_CONTEXT_BYTES = 64 * 1024 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # per chunk; the real bound is set per round (tenseal_format)
FINGERPRINT_BYTES = 32
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
        self.params  # validates the parameter set (ConfigError is a ValueError)

    @property
    def params(self) -> HeParams:
        return HeParams(
            self.scheme, self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits,
            self.plain_modulus_bits,
        )


@message
class HeUpload(Message):
    """Client -> server: the client's (pre-scaled) update, encrypted chunk by chunk."""

    TYPE: ClassVar[str] = "ckks.upload"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {
        "round_id": 64, "fingerprint": FINGERPRINT_BYTES, "chunks": MAX_CHUNK_BYTES,
    }

    round_id: bytes
    client_id: int
    fingerprint: bytes
    dim: int
    weighted: bool
    chunks: tuple[bytes, ...]


@message
class HeAggregate(Message):
    """Server -> key holder: the homomorphic sum and the clients it claims to have added."""

    TYPE: ClassVar[str] = "ckks.aggregate"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {
        "round_id": 64, "fingerprint": FINGERPRINT_BYTES, "chunks": MAX_CHUNK_BYTES,
    }

    round_id: bytes
    fingerprint: bytes
    dim: int
    weighted: bool
    included: tuple[int, ...]
    chunks: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(set(self.included)) != len(self.included):
            raise ValueError("included lists a client twice")
