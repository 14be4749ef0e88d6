"""Hazardous materials -- use ``secagg.protocol`` instead.

Key agreement (X25519), key derivation (HKDF-SHA256 with a domain-separation label for
every use), authenticated encryption of secret shares (AES-256-GCM) and Ed25519 identity
signatures. Everything comes from pyca/cryptography; nothing here is hand-rolled.

Every derived key carries an ``info`` label naming its purpose, the round and the pair of
parties, so a key agreed for one purpose can never be replayed for another (a flaw of
HKDF without ``info``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from secagg.errors import InvalidPublicKey, InvalidShare, InvalidSignature

KEY_BYTES = 32
NONCE_BYTES = 12

LABEL_PAIRWISE_MASK = b"secagg/v1/pairwise-mask"
LABEL_SHARE_ENCRYPTION = b"secagg/v1/share-encryption"


@dataclass(frozen=True)
class KeyPair:
    """A fresh X25519 key pair; generate a new one for every round."""

    private: X25519PrivateKey
    public_bytes: bytes

    @classmethod
    def generate(cls, seed: bytes | None = None) -> KeyPair:
        """A new key pair from the OS CSPRNG, or from ``seed`` (tests only: 32 bytes)."""
        raw = os.urandom(KEY_BYTES) if seed is None else seed
        return cls.from_private_bytes(raw)

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        private = X25519PrivateKey.from_private_bytes(raw)
        return cls(private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def agree(private: X25519PrivateKey, peer_public: bytes, *, label: bytes, context: bytes) -> bytes:
    """X25519 then HKDF-SHA256 into a 32-byte key bound to ``label`` and ``context``."""
    try:
        shared = private.exchange(_x25519_public(bytes(peer_public)))
    except ValueError:
        raise InvalidShare("peer public key is invalid (low-order point or wrong length)") from None
    return derive(shared, label=label, context=context)


# The u-coordinates of every X25519 public key of small order, reduced mod p: the points of
# order dividing 8 on Curve25519 (its group is Z/8 x Z/l) and of order dividing 4 on its
# quadratic twist (Z/4 x Z/l'), which X25519 also accepts. A scalar multiple of such a
# point by a clamped scalar (a multiple of 8) is the point at infinity, so exchanging with
# one gives the all-zero secret whatever the private key; every other point has a large
# prime-order component that clamping cannot kill. Checking the key against this list is
# therefore the same test as an exchange with a probe key (RFC 7748 s6.1), without the
# scalar multiplication. tests/test_scale.py checks each entry, every encoding of it and
# many other keys against the exchange itself.
_P25519 = 2**255 - 19
_LOW_ORDER_U = frozenset({
    0,  # order 2 (on both the curve and the twist)
    1,  # order 4 on the curve
    _P25519 - 1,  # order 4 on the twist
    325606250916557431795983626356110631294008115727848805560023387167927233504,  # order 8
    39382357235489614581723060781553021112529911719440698176882885853963445705823,  # order 8
})


def check_public_key(public: bytes) -> None:
    """Raise :class:`InvalidPublicKey` unless ``public`` is a usable X25519 key.

    A usable key is 32 bytes whose u-coordinate (top bit ignored and reduced mod p, as
    X25519 decodes it) is not of small order: see ``_LOW_ORDER_U``.
    """
    raw = bytes(public)
    if len(raw) != KEY_BYTES:
        raise InvalidPublicKey(f"X25519 public key must be {KEY_BYTES} bytes, got {len(raw)}")
    if (int.from_bytes(raw, "little") & ((1 << 255) - 1)) % _P25519 in _LOW_ORDER_U:
        raise InvalidPublicKey("X25519 public key is a low-order point; generate a fresh key pair")
    try:
        _x25519_public(raw)  # the parsed key is reused by agree()
    except ValueError:
        raise InvalidPublicKey("X25519 public key is malformed") from None


def derive(secret: bytes, *, label: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label + b"|" + context).derive(
        secret
    )


def pair_context(round_id: bytes, a: int, b: int) -> bytes:
    """Context for a key shared by parties ``a`` and ``b`` in one round (order-independent)."""
    lo, hi = sorted((a, b))
    return round_id + lo.to_bytes(8, "big") + hi.to_bytes(8, "big")


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM with a random nonce; output is nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; any tampering raises :class:`InvalidShare` (opaque)."""
    if len(blob) < NONCE_BYTES + 16:
        raise InvalidShare("encrypted share is truncated")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise InvalidShare("encrypted share failed authentication") from None


class IdentityKey:
    """A party's long-term Ed25519 signing key (its protocol identity)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_bytes = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls, seed: bytes | None = None) -> IdentityKey:
        raw = os.urandom(KEY_BYTES) if seed is None else seed
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> IdentityKey:
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise :class:`InvalidSignature` unless ``signature`` is valid; never returns a bool.

    A signature that verified once is remembered, so checking the very same signature by
    the same key over the same bytes again costs a SHA-256, not a curve verification: in one
    process every simulated client checks the same signed adverts and consistency
    signatures, which the server has already checked on receipt. Ed25519 verification is a
    deterministic function of (key, signature, message), so a remembered success is exactly
    what verifying again would return. Only successes are remembered: a bad signature is
    verified, and refused, every time. The message is remembered by its SHA-256 digest, so
    the memory stays small; a false hit would need a SHA-256 collision, 2^128 work like
    forging Ed25519 itself (the assumption every seal already makes, see
    ``secagg.wire._signed_bytes``). Public data only.
    """
    key = (bytes(public_key), bytes(signature), hashlib.sha256(data).digest())
    if key in _VERIFIED:
        return
    try:
        _ed25519_public(key[0]).verify(key[1], data)
    except (_CryptoInvalidSignature, ValueError):
        raise InvalidSignature("signature does not verify") from None
    _VERIFIED[key] = None
    if len(_VERIFIED) > VERIFIED_SIGNATURES_KEPT:
        _VERIFIED.pop(next(iter(_VERIFIED)), None)  # the oldest first (dicts keep insertion order)


#: verified (key, signature, SHA-256 of the message) kept per process: a few signatures per
#: client per round at N = 1000 (its seals, its consistency signature); a few MB at most
VERIFIED_SIGNATURES_KEPT = 1 << 14
_VERIFIED: dict[tuple[bytes, bytes, bytes], None] = {}


# Loading a public key decodes a curve point; a party checks the same peers' keys several
# times a round (adverts, then consistency signatures), so loaded keys are kept. Public
# data only; a key that fails to load raises and is not cached.
@functools.lru_cache(maxsize=1 << 14)
def _ed25519_public(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@functools.lru_cache(maxsize=1 << 14)
def _x25519_public(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)
