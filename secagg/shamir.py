"""Hazardous materials -- use ``secagg.protocol`` instead.

t-of-n Shamir secret sharing of byte strings over the prime field GF(2^31 - 1).

A secret of L bytes is cut into 3-byte limbs (each < 2^24 < p); every limb is shared with
its own random polynomial of degree t-1, so any t shares reveal the secret and any t-1
reveal nothing (perfect secrecy, limb by limb). Working in a 31-bit field keeps every
product below 2^62, so sharing and reconstruction are plain vectorised int64 numpy
arithmetic over all limbs of all secrets at once.

Reconstruction computes the Lagrange coefficients for a set of share holders once
(cached), then applies them to every secret held by that set in one vectorised pass -- the
server's unmasking cost is O(t^2 + t * secrets * limbs), not one interpolation per secret.

When some shares are wrong, :func:`honest_holders` finds them by Berlekamp-Welch decoding
(the shares of one secret are a Reed-Solomon codeword): with h shares and threshold t it
corrects up to (h - t) / 2 wrong ones.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
from threadpoolctl import ThreadpoolController

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
    values = evaluate(xs, coefficients.reshape(threshold, -1))
    return values.reshape((n,) + limbs.shape).astype(np.uint32)


#: above this many coefficients a float64 sum of t products of 16-bit halves could reach 2^53
MAX_EVALUATED_DEGREE = 1 << 21


def evaluate(xs: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Every polynomial at every point, mod p: ``out[h, j] = sum_k coefficients[k, j] * xs[h]^k``.

    One Vandermonde product (holders x t) @ (t x polynomials) instead of t Horner steps over
    all holders: at n = 1,000 holders and t = 667 that is 0.17 s of numpy temporaries a
    client against a few ms of BLAS. The product runs in float64 and is exact: the powers
    (< p < 2^31) and the coefficients are each cut into 16-bit halves, so each product of
    halves is below 2^32 and each sum of t of them below 2^53, where float64 holds every
    integer exactly (whatever the summation order); the four partial products (low and high
    halves of both) come out of one matrix product and are recombined mod p in int64. The
    powers of a holder set are cached (public values).

    The product runs on one BLAS thread (:func:`_one_blas_thread`): it is small (at most a
    few ms), and on a busy machine a threaded BLAS waits for its second thread far longer
    than the product takes (8-16 ms against 0.1 ms measured at 318 holders, t = 251).
    """
    t = coefficients.shape[0]
    if t > MAX_EVALUATED_DEGREE:
        raise ConfigError(f"threshold {t} exceeds the largest supported ({MAX_EVALUATED_DEGREE})")
    n = len(xs)
    powers = _vandermonde(tuple(int(x) for x in xs), t)  # (2n, t): low halves, then high halves
    c = np.asarray(coefficients, dtype=np.int64)
    polys = c.shape[1]
    halves = np.concatenate([c & 0xFFFF, c >> 16], axis=1).astype(np.float64)  # (t, 2 polys)
    with _one_blas_thread():
        product = np.matmul(powers, halves)  # exact integers < 2^53
    parts = product.astype(np.int64) % PRIME
    low, high = parts[:n], parts[n:]  # by the power's half; columns by the coefficient's half
    cross = (low[:, polys:] + high[:, :polys]) * pow(2, 16, PRIME) % PRIME  # < 2^32 * 2^16: no overflow
    return (low[:, :polys] + cross + high[:, polys:] * pow(2, 32, PRIME) % PRIME) % PRIME


_BLAS_LOCK = threading.Lock()


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the block on one BLAS thread, then restore the count (a lock keeps concurrent callers
    from restoring each other's setting)."""
    with _BLAS_LOCK, _blas().limit(limits=1, user_api="blas"):
        yield


@lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """The BLAS libraries numpy loaded (found once: the lookup walks the process's libraries)."""
    return ThreadpoolController().select(user_api="blas")


@lru_cache(maxsize=4)
def _vandermonde(xs: tuple[int, ...], t: int) -> np.ndarray:
    """x^k mod p for every x in ``xs`` and k < t, as float64 16-bit halves: the low halves of
    every row, then the high halves (a (2 len(xs), t) array).

    Each x's row is computed once per t and kept (:data:`_POWER_ROWS`): on a sparse graph
    every client shares among its own holder set, but the sets draw on the same n client
    ids, so a client assembles rows instead of raising 80,000 powers (2.2 ms at k = 318,
    t = 251). Public values only.
    """
    rows = _POWER_ROWS.get(t)
    if rows is None or len(rows) + len(xs) > POWER_ROWS_KEPT:
        rows = _POWER_ROWS[t] = {}
        while len(_POWER_ROWS) > 2:  # rows for the two latest thresholds
            _POWER_ROWS.pop(next(iter(_POWER_ROWS)))
    missing = [x for x in dict.fromkeys(xs) if x not in rows]
    if missing:
        for x, low, high in zip(missing, *_power_halves(np.asarray(missing, dtype=np.int64), t)):
            rows[x] = (low, high)
    halves = np.array([rows[x][0] for x in xs] + [rows[x][1] for x in xs], dtype=np.float64).reshape(2 * len(xs), t)
    halves.flags.writeable = False
    return halves


#: the most power rows kept per threshold (at t = 1,000 a row pair is 16 kB: 64 MB at most)
POWER_ROWS_KEPT = 4096
_POWER_ROWS: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}


def _power_halves(x: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """x^k mod p for k < t, per x, as float64 16-bit halves (low, high), each (len(x), t)."""
    powers = np.empty((len(x), t), dtype=np.int64)
    powers[:, 0] = 1
    filled = 1
    while filled < t:  # doubling: x^(filled + j) = x^j * x^filled, log2(t) vector steps
        step = powers[:, filled - 1] * x % PRIME
        count = min(filled, t - filled)
        powers[:, filled:filled + count] = powers[:, :count] * step[:, None] % PRIME
        filled += count
    return (powers & 0xFFFF).astype(np.float64), (powers >> 16).astype(np.float64)


def reconstruct(holders: Sequence[int], shares: np.ndarray, *, secret_bytes: int) -> list[bytes]:
    """Recover the secrets from ``shares[h, s, limb]`` held by ``holders`` (exactly t of them).

    Pass exactly ``threshold`` holders: extra shares cost time and add nothing.
    """
    secrets = secrets_from_limbs(interpolate_at_zero(holders, shares, secret_bytes=secret_bytes), secret_bytes)
    if any(s is None for s in secrets):
        raise InvalidShare("shares are inconsistent (reconstructed limb out of range)")
    return secrets


def interpolate_at_zero(holders: Sequence[int], shares: np.ndarray, *, secret_bytes: int,
                        weights: np.ndarray | None = None) -> np.ndarray:
    """The polynomials through ``shares[h, s, limb]`` at x = 0: an (s, limb) int64 array.

    One vectorised pass: weights are split into 16-bit halves so every partial sum of
    products stays below 2^63 (t < 2^16 holders). ``weights``: the holders' Lagrange
    weights when the caller computed them already (:func:`lagrange_at_zero_many`).
    """
    xs = tuple(int(h) for h in holders)
    shares = np.asarray(shares)
    if shares.ndim != 3 or shares.shape[0] != len(xs):
        raise InvalidShare("share array must be (holders, secrets, limbs)")
    if shares.shape[2] != limbs_for(secret_bytes):
        raise InvalidShare("shares have the wrong number of limbs for this secret size")
    if len(xs) >= 1 << 16:
        raise ConfigError("at most 65535 share holders per reconstruction")
    if np.any(shares >= PRIME):
        raise InvalidShare("share value outside the field")
    if weights is None:
        weights = lagrange_at_zero(xs)
    weights = np.asarray(weights, dtype=np.int64)
    if weights.shape != (len(xs),):
        raise ConfigError("give one Lagrange weight per holder")
    values = shares.astype(np.int64)
    low = np.tensordot(weights & 0xFFFF, values, axes=1) % PRIME
    high = np.tensordot(weights >> 16, values, axes=1) % PRIME
    return (low + (high << 16) % PRIME) % PRIME


def secrets_from_limbs(limbs: np.ndarray, secret_bytes: int) -> list[bytes | None]:
    """(s, limb) field elements -> s byte strings; None for a secret with a limb >= 2^24 (inconsistent shares)."""
    bad = np.any(limbs >= 1 << (8 * LIMB_BYTES), axis=1)
    out = _from_limbs(np.where(limbs >= 1 << (8 * LIMB_BYTES), 0, limbs), secret_bytes)
    return [None if b else s for s, b in zip(out, bad.tolist())]


def decode_shares(blobs: Sequence[bytes], *, secret_bytes: int) -> np.ndarray:
    """Many serialised shares -> a (count, limbs) uint32 array, in one pass; raises on any bad one."""
    size = share_bytes(secret_bytes)
    if any(len(b) != size for b in blobs):
        raise InvalidShare(f"every share must be {size} bytes")
    out = np.frombuffer(b"".join(blobs), dtype="<u4").reshape(len(blobs), size // 4).astype(np.uint32)
    if np.any(out >= PRIME):
        raise InvalidShare("share value outside the field")
    return out


MAX_CORRECTED = 64  # Berlekamp-Welch uses at most t + 2 * 64 shares: O((t + 128)^3) field operations


def honest_holders(
    holders: Sequence[int], shares: np.ndarray, threshold: int
) -> tuple[list[int], list[int]] | None:
    """(holders whose share lies on the polynomial, holders whose share does not), for one secret.

    ``shares[h, limb]``: one share per holder. Berlekamp-Welch decoding of a random linear
    combination of the limbs (a wrong share survives the combination with probability
    1 - 1/p) finds an error locator E; holders where E is non-zero are provably on the
    true polynomial. The first list has at least ``threshold`` holders; the second lists the
    holders examined (at most t + 2 * MAX_CORRECTED) that are off it. None when more than
    (h - t) / 2 of the shares used are wrong.
    """
    h = len(holders)
    errors = min((h - threshold) // 2, MAX_CORRECTED)
    if errors < 1:
        return None
    used = threshold + 2 * errors
    xs = np.asarray(holders[:used], dtype=np.int64)
    mix = _random_field_elements((shares.shape[1],))
    ys = np.zeros(used, dtype=np.int64)
    for limb in range(shares.shape[1]):
        ys = (ys + shares[:used, limb].astype(np.int64) * int(mix[limb])) % PRIME
    powers = np.ones((used, errors + threshold), dtype=np.int64)
    for j in range(1, errors + threshold):
        powers[:, j] = powers[:, j - 1] * xs % PRIME
    # Unknowns: Q's errors + threshold coefficients, then E's errors + 1; Q(x_i) - y_i E(x_i) = 0.
    system = np.concatenate([powers, (PRIME - ys)[:, None] * powers[:, : errors + 1] % PRIME], axis=1)
    solution = _null_vector(system)
    if solution is None:
        return None
    locator = solution[errors + threshold:]
    if not _divides([int(c) for c in locator], [int(c) for c in solution[: errors + threshold]]):
        return None  # more wrong shares than the code corrects
    at_x = np.zeros(used, dtype=np.int64)
    for coefficient in locator[::-1]:
        at_x = (at_x * xs + int(coefficient)) % PRIME
    good = [int(x) for x, e in zip(xs.tolist(), at_x.tolist()) if e != 0]
    if len(good) < threshold:
        return None
    # Roots of E are not necessarily wrong (E may have spare roots): test them against P.
    weights = [lagrange_at(tuple(good[:threshold]), x) for x in xs.tolist()]
    base = np.asarray([ys[np.flatnonzero(xs == g)[0]] for g in good[:threshold]], dtype=np.int64)
    wrong = [int(x) for x, w, y in zip(xs.tolist(), weights, ys.tolist())
             if int(np.dot(np.asarray(w, dtype=object), base.astype(object)) % PRIME) != y]
    return [x for x in xs.tolist() if x not in wrong], wrong


def _divides(divisor: list[int], dividend: list[int]) -> bool:
    """Whether polynomial ``divisor`` divides ``dividend`` over GF(p) (coefficients lowest first)."""
    while divisor and divisor[-1] == 0:
        divisor = divisor[:-1]
    if not divisor:
        return False
    rest = list(dividend)
    inverse = pow(divisor[-1], -1, PRIME)
    for top in range(len(rest) - 1, len(divisor) - 2, -1):
        factor = rest[top] * inverse % PRIME
        if factor:
            shift = top - len(divisor) + 1
            for i, c in enumerate(divisor):
                rest[shift + i] = (rest[shift + i] - factor * c) % PRIME
    return not any(rest[: len(divisor) - 1])


def _null_vector(matrix: np.ndarray) -> np.ndarray | None:
    """A non-zero v with matrix @ v = 0 over GF(p) (Gauss-Jordan on numpy rows), or None."""
    a = matrix % PRIME
    rows, cols = a.shape
    pivots: list[int] = []
    r = 0
    for c in range(cols):
        if r == rows:
            break
        nonzero = np.flatnonzero(a[r:, c])
        if nonzero.size == 0:
            continue
        p = r + int(nonzero[0])
        a[[r, p]] = a[[p, r]]
        a[r] = a[r] * pow(int(a[r, c]), -1, PRIME) % PRIME
        factors = a[:, c].copy()
        factors[r] = 0
        a = (a - factors[:, None] * a[r][None, :] % PRIME) % PRIME
        pivots.append(c)
        r += 1
    free = [c for c in range(cols) if c not in set(pivots)]
    if not free:
        return None
    v = np.zeros(cols, dtype=np.int64)
    v[free[0]] = 1
    for i, c in enumerate(pivots):
        v[c] = (-a[i, free[0]]) % PRIME
    return v


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis values at 0 for the points ``xs`` in GF(p), computed once per holder set.

    w_i = prod_{j != i} x_j / (x_j - x_i) = P / (x_i * D_i), with P the product of all
    points and D_i = prod_{j != i} (x_j - x_i): one t x t row product (log2 t vectorised
    halvings) and one vectorised batch of Fermat inverses. A sparse round has a holder set
    per client: :func:`lagrange_at_zero_many` computes those in batches.
    """
    return tuple(_lagrange_rows(_check_holders(xs)[None, :])[0].tolist())


#: int64 entries of the t x t difference matrices one batch of :func:`lagrange_at_zero_many` holds
#: (2 MiB, about a core's L2 cache: 4 MiB batches were 2.7x slower at t = 251)
_LAGRANGE_BATCH_ENTRIES = 1 << 18


def lagrange_at_zero_many(sets: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """:func:`lagrange_at_zero` of every holder set in ``sets`` (int64 arrays), the same size sets batched.

    One vectorised pass per batch of same-sized sets instead of one per set: a server
    rebuilding the secrets of N clients on a sparse graph has N distinct holder sets, and
    at t = 163-251 a batch of sets is cheaper than the sets one by one (CPU per set, same
    run, load 5: 0.45 -> 0.27 ms at t = 163, 0.68 -> 0.55 ms at t = 251).
    """
    out: list[np.ndarray | None] = [None] * len(sets)
    by_size: dict[int, list[int]] = {}
    for i, xs in enumerate(sets):
        by_size.setdefault(len(xs), []).append(i)
    for size, members in by_size.items():
        step = max(1, _LAGRANGE_BATCH_ENTRIES // max(size * size, 1))
        for first in range(0, len(members), step):
            batch = members[first:first + step]
            x = np.stack([_check_holders(sets[i]) for i in batch])
            for i, row in zip(batch, _lagrange_rows(x)):
                out[i] = row
    return out  # type: ignore[return-value]


def _lagrange_rows(x: np.ndarray) -> np.ndarray:
    """Lagrange weights at 0 for each row of ``x`` (g, t): distinct points of GF(p), checked by the caller."""
    differences = (x[:, None, :] - x[:, :, None]) % PRIME
    diagonal = np.arange(x.shape[1])
    differences[:, diagonal, diagonal] = 1
    denominators = _row_products(differences) * x % PRIME
    totals = _row_products(x)
    return totals[:, None] * _inverses(denominators) % PRIME


def _inverses(values: np.ndarray) -> np.ndarray:
    """a^(p - 2) = a^-1 mod p for every (non-zero) a, by square-and-multiply over the bits of p - 2."""
    result = np.ones_like(values)
    base = values % PRIME
    exponent = PRIME - 2
    while exponent:
        if exponent & 1:
            result = result * base % PRIME
        base = base * base % PRIME
        exponent >>= 1
    return result


def _row_products(matrix: np.ndarray) -> np.ndarray:
    """Product mod p along the last axis of int64 ``matrix`` with entries in [0, p) (not checked:
    the one caller's are reduced), by pairwise halving (every product stays below 2^62)."""
    m = matrix
    while m.shape[-1] > 1:
        if m.shape[-1] % 2:
            m = np.concatenate([m, np.ones(m.shape[:-1] + (1,), dtype=np.int64)], axis=-1)
        m = m[..., 0::2] * m[..., 1::2] % PRIME
    return m[..., 0]


def lagrange_at(xs: tuple[int, ...], x: int) -> tuple[int, ...]:
    """Lagrange basis values at ``x`` for the points ``xs`` in GF(p)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def encode_share(share: np.ndarray) -> bytes:
    """Shares -> bytes (little-endian uint32 limbs, in array order): one holder's share of one
    secret, or a whole ``split`` result at once (holder by holder, secret by secret)."""
    return np.ascontiguousarray(share, dtype="<u4").tobytes()


def decode_share(data: bytes, *, secret_bytes: int) -> np.ndarray:
    check_share(data, secret_bytes=secret_bytes)
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def check_share(data: bytes, *, secret_bytes: int) -> None:
    """Raise :class:`InvalidShare` unless ``data`` is one serialised share (right size, every limb < p).

    Plain ``struct`` rather than numpy: a client checks one small share per neighbour, and
    at 11 limbs the numpy call overhead is most of the cost.
    """
    size = share_bytes(secret_bytes)
    if len(data) != size:
        raise InvalidShare(f"share must be {size} bytes, got {len(data)}")
    if max(struct.unpack(f"<{size // 4}I", data)) >= PRIME:
        raise InvalidShare("share value outside the field")


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
