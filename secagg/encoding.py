"""Hazardous materials -- use ``secagg.aggregate`` or ``secagg.protocol`` instead.

Fixed-point encoding of float updates into the ring Z_{2^k}, where masks cancel exactly.

An update is clipped (L2 norm or per coordinate) to a bound ``c``, scaled by ``scale``,
stochastically rounded to an integer (unbiased: E[round(x)] = x), and taken mod 2^k.
The sum of n encodings decodes correctly as long as |sum| < 2^(k-1), so the encoder
refuses a configuration where n * (c * scale + 1) could reach 2^(k-1) (an error, never a
silent wrap-around). Rounding randomness is not secret (it only has to be unbiased), but
it is drawn from the OS CSPRNG anyway so no numpy global RNG state is involved.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from secagg.errors import ConfigError, InputError, OverflowRisk
from secagg.prg import expand_uint64

CLIP_MODES = ("l2", "coordinate")
SUPPORTED_BITS = range(8, 33)


@dataclass(frozen=True)
class FixedPointCodec:
    """Encoder/decoder agreed by every party of a round.

    ``clip`` bounds every coordinate of a client's (clipped) update in absolute value;
    ``scale`` is the number of integer steps per unit; ``bits`` the ring size 2^bits;
    ``max_clients`` the number of encodings that may be summed without overflow.
    """

    clip: float
    scale: float
    bits: int = 32
    max_clients: int = 1
    clip_mode: str = "l2"
    headroom: float = 0.0  # extra per-coordinate range reserved for distributed noise

    def __post_init__(self) -> None:
        _check_parameters(clip=self.clip, bits=self.bits, max_clients=self.max_clients,
                          clip_mode=self.clip_mode, headroom=self.headroom)
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"scale must be a positive finite number, got {self.scale}")
        worst = self.max_clients * ((self.clip + self.headroom) * self.scale + 1)
        if worst >= 2 ** (self.bits - 1):
            raise OverflowRisk(
                f"the sum of {self.max_clients} updates clipped to {self.clip} at scale {self.scale:g} "
                f"can reach {worst:.3g}, beyond the signed range of {self.bits}-bit integers; "
                "use more bits, a smaller scale, or clip harder"
            )

    @classmethod
    def for_clients(
        cls, *, clip: float, max_clients: int, bits: int = 32, clip_mode: str = "l2", headroom: float = 0.0
    ) -> FixedPointCodec:
        """The finest scale (a power of two) for which ``max_clients`` sums cannot overflow.

        ``headroom`` reserves extra per-coordinate range (in update units) for noise that
        clients add after clipping, e.g. 10 standard deviations of distributed DP noise.
        """
        _check_parameters(clip=clip, bits=bits, max_clients=max_clients, clip_mode=clip_mode, headroom=headroom)
        if 2 ** (bits - 1) / max_clients - 1 <= 0:
            raise OverflowRisk(f"{max_clients} clients cannot be summed in {bits} bits; use more bits")
        span = clip + headroom
        scale = 2.0 ** math.floor(math.log2(max(2 ** (bits - 1) / max_clients - 1, 1) / span))
        while max_clients * (span * scale + 1) >= 2 ** (bits - 1):
            scale /= 2
        return cls(clip=clip, scale=scale, bits=bits, max_clients=max_clients, clip_mode=clip_mode, headroom=headroom)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def resolution(self) -> float:
        """Largest rounding error of one encoded coordinate."""
        return 1.0 / self.scale

    def sum_error_bound(self, n: int) -> float:
        """Largest per-coordinate error of a decoded sum of ``n`` encodings (rounding only)."""
        return n / self.scale

    def clip_update(self, x: np.ndarray) -> np.ndarray:
        """Clip ``x`` to the codec's bound; refuses NaN/inf and non-vectors."""
        x = check_vector(x)
        if self.clip_mode == "coordinate":
            return np.clip(x, -self.clip, self.clip)
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            return x * (self.clip / norm)
        return x

    def encode(
        self, x: np.ndarray, *, rounding_seed: bytes | None = None, integer_noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Clip, scale, stochastically round, add ``integer_noise`` and map to residues mod 2^bits."""
        clipped = self.clip_update(x)
        scaled = clipped.astype(np.float64) * self.scale
        floor = np.floor(scaled)
        frac = scaled - floor
        uniform = _uniform01(frac.size, rounding_seed).reshape(frac.shape)
        integers = (floor + (uniform < frac)).astype(np.int64)
        if integer_noise is not None:
            noise = np.asarray(integer_noise)
            if noise.shape != integers.shape or not np.issubdtype(noise.dtype, np.integer):
                raise InputError(f"integer noise must be an integer vector of {integers.shape[0]} entries")
            limit = self.headroom * self.scale
            if np.any(np.abs(noise) > limit):
                raise OverflowRisk(
                    "noise exceeds the headroom reserved in the encoding; raise `noise_headroom`"
                )
            integers = integers + noise.astype(np.int64)
        return self.to_ring(integers)

    def to_ring(self, integers: np.ndarray) -> np.ndarray:
        """Signed integers -> residues mod 2^bits stored as uint32."""
        return (integers.astype(np.int64) & (self.modulus - 1)).astype(np.uint32)

    def decode_sum(self, residues: np.ndarray) -> np.ndarray:
        """Residues of a sum of encodings -> float sum (centred lift, then unscale)."""
        r = np.asarray(residues, dtype=np.int64) & (self.modulus - 1)
        half = self.modulus >> 1
        signed = np.where(r >= half, r - self.modulus, r)
        return signed.astype(np.float64) / self.scale


def _check_parameters(*, clip: float, bits: int, max_clients: int, clip_mode: str, headroom: float) -> None:
    """The checks a codec's parameters must pass whether the scale is given or derived."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be between 8 and 32, got {bits}")
    if clip_mode not in CLIP_MODES:
        raise ConfigError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"clip must be a positive finite number, got {clip}")
    if max_clients < 1:
        raise ConfigError("max_clients must be at least 1")
    if not (headroom >= 0 and math.isfinite(headroom)):
        raise ConfigError(f"headroom must be a non-negative finite number, got {headroom}")


def check_vector(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a 1-D float64 array or raise :class:`InputError` explaining why not."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("update must be a numeric vector") from None
    if arr.ndim != 1:
        raise InputError(f"update must be a 1-D vector, got shape {arr.shape}; flatten it first")
    if dim is not None and arr.shape[0] != dim:
        raise InputError(f"update has {arr.shape[0]} entries, the round expects {dim}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise InputError(f"update contains {bad} NaN/inf values; fix the local training step (lower lr, clip)")
    return arr


def _uniform01(size: int, seed: bytes | None) -> np.ndarray:
    """Uniform [0,1) doubles from the AES-CTR PRG (53-bit resolution)."""
    words = expand_uint64(seed if seed is not None else os.urandom(32), size, label=b"rounding")
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
