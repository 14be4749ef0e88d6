"""Homomorphic-encryption parameters for the ``ckks`` protection mode, and their validation.

A parameter set is public: every party of a round agrees on it before any key exists.
Validation refuses, with a :class:`~secagg.errors.ConfigError` that names the fix, anything
below 128-bit security (the HomomorphicEncryption.org standard table that SEAL enforces),
a scale that leaves no room for the sum, or a BFV plaintext modulus too large for the
number of clients to be added.

Two schemes share the same protocol:

* ``ckks`` (default): poly modulus 8192, coefficient moduli [60, 40], scale 2^40. The 40-bit
  prime is the special (key-switching) prime: a public-key encryption is computed at
  modulus q0*p and switched down to q0, which divides its noise by p. Ciphertexts travel
  at q0 alone, so they are 2 * 8192 * 8 bytes for 4096 values (32 bytes per parameter).
  Slot noise is about 1e-9 per client at scale 2^40; the data prime leaves 2^19 of
  headroom above the scale for the magnitude of the sum.
* ``bfv`` (quantized, halves the upload): poly modulus 4096, coefficient moduli [60, 49],
  batching 4096 integers per ciphertext (16 bytes per parameter). Values are quantized
  to integers modulo a 40-bit prime t; the decrypted sum is exact (no approximation
  noise reaches the released values), so the only error is the fixed-point rounding,
  about 2e-7 for 100 clients with |x| <= 1. The quantization leaves ``BFV_HEADROOM_BITS``
  of headroom above the largest legitimate sum, so that an out-of-range contribution
  lands outside the range the key holder accepts instead of wrapping back into it, and
  every ciphertext carries ``BFV_CHECK_SLOTS`` slots that must decrypt to exactly zero
  (a corrupted ciphertext changes them with probability about 1 - 1/t each). SEAL scales plaintexts by round(q*m/t), so
  carries of the batched plaintexts cancel; each fresh ciphertext (switched down from
  q0*p) carries noise below 2^10 and decryption stays exact while k * 2^10 < q0 / (2t).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import cached_property

from secagg.errors import ConfigError, OverflowRisk

SCHEMES = ("ckks", "bfv")

# Largest total coefficient-modulus size (bits) for 128-bit classical security with a
# ternary secret, per the HomomorphicEncryption.org security standard (Albrecht et al.,
# 2018, Table 1) -- the same table SEAL's CoeffModulus::MaxBitCount uses for tc128.
MAX_COEFF_BITS_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

MIN_SCALE_BITS = 20  # below this CKKS noise (~2^10 after mod switching) swamps the message
MAX_PRIME_BITS = 60  # SEAL's limit for one coefficient-modulus prime
MIN_PRIME_BITS = 20
# Bound on the noise of one fresh ciphertext after switching from q0*p down to q0: the
# rounding term (1 + |s|_1) / 2 has standard deviation ~15 for n = 4096; 2^10 is ~70 sigma.
FRESH_NOISE_BOUND = 2**10
# BFV: legitimate sums use at most 2^-BFV_HEADROOM_BITS of the plaintext range (-t/2, t/2),
# so a contribution up to 2^BFV_HEADROOM_BITS times the sum bound cannot wrap back in range.
BFV_HEADROOM_BITS = 4
# BFV: slots per ciphertext that every client encrypts as 0 and the key holder checks.
BFV_CHECK_SLOTS = 2


@dataclass(frozen=True)
class HeParams:
    """One public parameter set. Build it with :meth:`ckks` or :meth:`bfv` and call nothing else.

    ``coeff_mod_bit_sizes`` lists the primes; the last one is SEAL's special prime, the
    others are the data level ciphertexts travel at. ``scale_bits`` is the CKKS scale
    log2 (ignored for BFV). ``plain_modulus_bits`` is the BFV plaintext modulus size.
    """

    scheme: str = "ckks"
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 40
    plain_modulus_bits: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        validate(self)

    @classmethod
    def ckks(cls, poly_modulus_degree: int = 8192, coeff_mod_bit_sizes=(60, 40), scale_bits: int = 40) -> HeParams:
        return cls("ckks", poly_modulus_degree, tuple(coeff_mod_bit_sizes), scale_bits, 0)

    @classmethod
    def bfv(cls, poly_modulus_degree: int = 4096, coeff_mod_bit_sizes=(60, 49), plain_modulus_bits: int = 40) -> HeParams:
        return cls("bfv", poly_modulus_degree, tuple(coeff_mod_bit_sizes), 0, plain_modulus_bits)

    @property
    def slots(self) -> int:
        """Values packed in one ciphertext."""
        return self.poly_modulus_degree // 2 if self.scheme == "ckks" else self.poly_modulus_degree

    @property
    def data_bits(self) -> int:
        """log2 of the modulus ciphertexts travel at (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def data_primes(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @cached_property
    def plain_modulus(self) -> int:
        """BFV: the largest prime t < 2^plain_modulus_bits with t = 1 mod 2n (batching); 0 for CKKS."""
        if self.scheme != "bfv":
            return 0
        return batching_prime(self.plain_modulus_bits, self.poly_modulus_degree)

    @property
    def ciphertext_bytes(self) -> int:
        """Raw size of one fresh ciphertext's coefficient data (2 polynomials at the data level)."""
        return 2 * self.poly_modulus_degree * self.data_primes * 8

    def headroom(self) -> float:
        """CKKS: the largest |sum| a slot can hold without wrapping (with a factor 2 margin)."""
        return 2.0 ** (self.data_bits - self.scale_bits - 2)

    def max_bfv_clients(self) -> int:
        """BFV: how many fresh ciphertexts can be added before noise could reach q0 / (2t)."""
        q0 = 2 ** (self.data_bits - 1)  # SEAL's primes lie just below 2^bits
        return max(0, int(q0 // (2 * self.plain_modulus * FRESH_NOISE_BOUND)))


def validate(p: HeParams) -> None:
    """Raise ConfigError for any parameter set below 128-bit security or unusable for sums."""
    if p.scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {SCHEMES}, got {p.scheme!r}")
    n = p.poly_modulus_degree
    if n not in MAX_COEFF_BITS_128:
        raise ConfigError(
            f"poly_modulus_degree must be a power of two in {sorted(MAX_COEFF_BITS_128)}, got {n}"
        )
    bits = p.coeff_mod_bit_sizes
    if len(bits) < 2:
        raise ConfigError(
            "coeff_mod_bit_sizes needs at least two primes: data prime(s) then the special prime "
            "(without it public-key encryption noise is not switched down); e.g. [60, 40]"
        )
    for b in bits:
        if not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS:
            raise ConfigError(f"each coefficient-modulus prime must have {MIN_PRIME_BITS}..{MAX_PRIME_BITS} bits, got {b}")
    total = sum(bits)
    limit = MAX_COEFF_BITS_128[n]
    if total > limit:
        raise ConfigError(
            f"insecure parameters: poly_modulus_degree {n} with a {total}-bit coefficient modulus "
            f"gives less than 128-bit security (the limit is {limit} bits); use fewer or smaller "
            f"primes, or poly_modulus_degree {2 * n}"
        )
    if p.scheme == "ckks":
        if n < 4096:
            raise ConfigError("CKKS needs poly_modulus_degree >= 4096 for a useful precision and packing")
        if not MIN_SCALE_BITS <= p.scale_bits:
            raise ConfigError(f"scale_bits must be at least {MIN_SCALE_BITS} (precision), got {p.scale_bits}")
        if p.data_bits - p.scale_bits < 8:
            raise ConfigError(
                f"scale 2^{p.scale_bits} leaves {p.data_bits - p.scale_bits} bits of headroom under the "
                f"{p.data_bits}-bit data modulus; the sum would wrap. Lower scale_bits or use a larger "
                "first prime (e.g. [60, 40] with scale 2^40 leaves 20 bits)"
            )
        if p.plain_modulus_bits:
            raise ConfigError("plain_modulus_bits is a BFV parameter; leave it 0 for CKKS")
    else:
        if n < 4096:
            raise ConfigError("BFV needs poly_modulus_degree >= 4096 (a single data prime of useful size)")
        if not 17 <= p.plain_modulus_bits <= 50:
            raise ConfigError(f"BFV plain_modulus_bits must be in 17..50, got {p.plain_modulus_bits}")
        if p.max_bfv_clients() < 2:
            raise ConfigError(
                f"BFV plain modulus of {p.plain_modulus_bits} bits is too large for a "
                f"{p.data_bits}-bit data modulus: even two ciphertexts could not be added. "
                "Use fewer plain-modulus bits"
            )


def check_capacity(params: HeParams, *, sum_bound: float, n_clients: int) -> None:
    """Refuse a round whose sum could wrap around (CKKS headroom, BFV carry-noise budget)."""
    if params.scheme == "ckks":
        if sum_bound >= params.headroom():
            raise OverflowRisk(
                f"the sum can reach {sum_bound:.3g} but scale 2^{params.scale_bits} under a "
                f"{params.data_bits}-bit data modulus only holds |sum| < {params.headroom():.3g}; "
                "clip harder, lower scale_bits or enlarge the first prime"
            )
    elif n_clients > params.max_bfv_clients():
        raise OverflowRisk(
            f"BFV with a {params.plain_modulus_bits}-bit plain modulus can add at most "
            f"{params.max_bfv_clients()} ciphertexts, the round has {n_clients}; lower plain_modulus_bits"
        )


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (bases from Sorenson & Webster 2015)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(bits: int, poly_modulus_degree: int) -> int:
    """Largest prime below 2^bits congruent to 1 mod 2n (needed by BFV batching)."""
    step = 2 * poly_modulus_degree
    t = ((1 << bits) - 1) // step * step + 1
    while t > step:
        if _is_prime(t):
            return t
        t -= step
    raise ConfigError(f"no batching prime of {bits} bits for poly_modulus_degree {poly_modulus_degree}")


def bfv_quantization_scale(params: HeParams, sum_bound: float, n_clients: int) -> float:
    """Integer factor so that |sum of n rounded, quantized values| stays below t/2 / 2^headroom.

    The headroom (``BFV_HEADROOM_BITS``) is what lets the key holder see an out-of-range
    contribution: without it every value modulo t decodes to something inside the bound.
    """
    t = params.plain_modulus
    room = (t // 2 - 1 - n_clients) / (2**BFV_HEADROOM_BITS * max(sum_bound, 1e-300))
    room = min(room, sys.float_info.max)  # a bound near 1e-300 overflows to inf; any finite factor is exact enough
    if room < 1:
        raise OverflowRisk(f"BFV plain modulus {t} cannot hold a sum bounded by {sum_bound:g}")
    return float(math.floor(room))
