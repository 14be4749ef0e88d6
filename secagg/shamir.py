"""Hazardous materials -- use ``secagg.protocol`` instead.

t-of-n Shamir secret sharing of byte strings over the prime field GF(2^31 - 1).

A secret of L bytes is cut into 3-byte limbs (each < 2^24 < p); every limb is shared with
its own random polynomial of degree t-1, so any t shares reveal the secret and any t-1
reveal nothing (perfect secrecy, limb by limb). Working in a 31-bit field keeps every
product below 2^62, so sharing and reconstruction are plain vectorised int64 numpy
arithmetic over all limbs of all secrets at once.

Reconstruction computes the Lagrange coefficients for a set of share holders once
(cached), then applies them to every secret held by that set in one pass -- the server's
unmasking cost is O(t^2 + t * secrets * limbs), not one interpolation per secret.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from secagg.errors import ConfigError, InvalidShare

PRIME = (1 << 31) - 1
LIMB_BYTES = 3


def limbs_for(secret_bytes: int) -> int:
    return -(-secret_bytes // LIMB_BYTES)


def share_bytes(secret_bytes: int) -> int:
    """Size in bytes of one serialised share of a ``secret_bytes``-long secret."""
    return 4 * limbs_for(secret_bytes)


def split(secrets: Sequence[bytes], *, threshold: int, holders: Sequence[int]) -> np.ndarray:
    """Share each secret among ``holders`` (x-coordinates, distinct, 1 <= x < p).

    Returns uint32 array ``shares[h, s, limb]``: holder h's share of secret s.
    """
    n = len(holders)
    if not 1 <= threshold <= n:
        raise ConfigError(f"threshold must be between 1 and the number of holders ({n}), got {threshold}")
    xs = _check_holders(holders)
    if not secrets:
        return np.zeros((n, 0, 0), dtype=np.uint32)
    length = len(secrets[0])
    if any(len(s) != length for s in secrets):
        raise ConfigError("all secrets shared in one call must have the same length")
    limbs = _to_limbs(secrets)  # (s, L)
    # coefficients[k] multiplies x^k; coefficient 0 is the secret itself.
    coefficients = np.empty((threshold,) + limbs.shape, dtype=np.int64)
    coefficients[0] = limbs
    if threshold > 1:
        coefficients[1:] = _random_field_elements((threshold - 1,) + limbs.shape)
    # Horner evaluation at every holder at once: acc = acc * x + c_k.
    x = xs.reshape(n, 1, 1)
    acc = np.zeros((n,) + limbs.shape, dtype=np.int64)
    for k in range(threshold - 1, -1, -1):
        acc = (acc * x + coefficients[k]) % PRIME
    return acc.astype(np.uint32)


def reconstruct(holders: Sequence[int], shares: np.ndarray, *, secret_bytes: int) -> list[bytes]:
    """Recover the secrets from ``shares[h, s, limb]`` held by ``holders`` (exactly t of them).

    Pass exactly ``threshold`` holders: extra shares cost time and add nothing.
    """
    xs = tuple(int(h) for h in holders)
    shares = np.asarray(shares)
    if shares.ndim != 3 or shares.shape[0] != len(xs):
        raise InvalidShare("share array must be (holders, secrets, limbs)")
    if shares.shape[2] != limbs_for(secret_bytes):
        raise InvalidShare("shares have the wrong number of limbs for this secret size")
    if np.any(shares >= PRIME):
        raise InvalidShare("share value outside the field")
    weights = lagrange_at_zero(xs)
    acc = np.zeros(shares.shape[1:], dtype=np.int64)
    for weight, share in zip(weights, shares.astype(np.int64)):
        acc = (acc + weight * share) % PRIME
    if np.any(acc >= 1 << (8 * LIMB_BYTES)):
        raise InvalidShare("shares are inconsistent (reconstructed limb out of range)")
    return _from_limbs(acc, secret_bytes)


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis values at 0 for the points ``xs`` in GF(p), computed once per holder set."""
    _check_holders(xs)
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def encode_share(share: np.ndarray) -> bytes:
    """One holder's share of one secret -> bytes (little-endian uint32 limbs)."""
    return np.ascontiguousarray(share, dtype="<u4").tobytes()


def decode_share(data: bytes, *, secret_bytes: int) -> np.ndarray:
    if len(data) != share_bytes(secret_bytes):
        raise InvalidShare(f"share must be {share_bytes(secret_bytes)} bytes, got {len(data)}")
    share = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if np.any(share >= PRIME):
        raise InvalidShare("share value outside the field")
    return share


def _check_holders(holders: Sequence[int]) -> np.ndarray:
    xs = np.asarray(holders, dtype=np.int64)
    if xs.ndim != 1 or len(set(xs.tolist())) != len(xs):
        raise ConfigError("share holders must be distinct integers")
    if np.any(xs < 1) or np.any(xs >= PRIME):
        raise ConfigError("share holder ids must be between 1 and 2^31 - 2 (0 is the secret)")
    return xs


def _to_limbs(secrets: Sequence[bytes]) -> np.ndarray:
    length = len(secrets[0])
    padded_len = limbs_for(length) * LIMB_BYTES
    raw = np.frombuffer(b"".join(s.ljust(padded_len, b"\0") for s in secrets), dtype=np.uint8)
    raw = raw.reshape(len(secrets), -1, LIMB_BYTES).astype(np.int64)
    return raw[..., 0] | (raw[..., 1] << 8) | (raw[..., 2] << 16)


def _from_limbs(limbs: np.ndarray, secret_bytes: int) -> list[bytes]:
    parts = np.stack([limbs & 0xFF, (limbs >> 8) & 0xFF, (limbs >> 16) & 0xFF], axis=-1).astype(np.uint8)
    return [row.tobytes()[:secret_bytes] for row in parts.reshape(limbs.shape[0], -1)]


def _random_field_elements(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of GF(p) from os.urandom by rejection sampling (no modulo bias)."""
    count = int(np.prod(shape))
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        need = count - out.size
        draw = np.frombuffer(os.urandom(4 * (need + 16)), dtype="<u4").astype(np.int64) & PRIME
        out = np.concatenate([out, draw[draw < PRIME][:need]])
    return out.reshape(shape)
