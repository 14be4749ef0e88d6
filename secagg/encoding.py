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
ENCODE_CHUNK = 1 << 18  # entries encoded per pass: 2 MiB float64 temporaries (a multiple of 2: rounding-stream
# offsets stay block-aligned)
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
        """Clip ``x`` to the codec's bound (as float64); refuses NaN/inf and non-vectors."""
        x = check_vector(x).astype(np.float64, copy=False)
        if self.clip_mode == "coordinate":
            return np.clip(x, -self.clip, self.clip)
        factor = self._l2_factor(x)
        return x if factor is None else x * factor

    def encode(
        self, x: np.ndarray, *, rounding_seed: bytes | None = None, integer_noise: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Clip, scale, stochastically round, add ``integer_noise`` and map to residues mod 2^bits.

        Works through the vector ``ENCODE_CHUNK`` entries at a time, so the float64 and
        int64 temporaries stay a few MiB whatever the dimension; the output is the same
        as encoding the whole vector at once (the rounding stream is read at each chunk's
        offset). ``out`` (a uint32 vector of the same length) receives the residues, e.g.
        the slot of a message being built, instead of a new array.
        """
        x = check_vector(x)
        if integer_noise is not None:
            integer_noise = np.asarray(integer_noise)
            if integer_noise.shape != x.shape or not np.issubdtype(integer_noise.dtype, np.integer):
                raise InputError(f"integer noise must be an integer vector of {x.shape[0]} entries")
        factor = None if self.clip_mode == "coordinate" else self._l2_factor(x)
        seed = rounding_seed if rounding_seed is not None else os.urandom(32)
        if out is None:
            out = np.empty(x.shape[0], dtype=np.uint32)
        elif out.dtype != np.uint32 or out.shape != x.shape:
            raise InputError(f"the output of encode must be a uint32 vector of {x.shape[0]} entries")
        for start in range(0, x.shape[0], ENCODE_CHUNK):
            stop = min(start + ENCODE_CHUNK, x.shape[0])
            noise = None if integer_noise is None else integer_noise[start:stop]
            out[start:stop] = self._encode_chunk(x[start:stop], factor, _uniform01(seed, start, stop - start), noise)
        return out

    def _encode_chunk(
        self, x: np.ndarray, factor: float | None, uniform: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        scaled = x.astype(np.float64)  # always a fresh copy, worked on in place
        if self.clip_mode == "coordinate":
            np.clip(scaled, -self.clip, self.clip, out=scaled)
        elif factor is not None:
            scaled *= factor
        scaled *= self.scale
        floor = np.floor(scaled)
        frac = np.subtract(scaled, floor, out=scaled)
        integers = (floor + (uniform < frac)).astype(np.int64)
        if noise is not None:
            if np.any(np.abs(noise) > self.headroom * self.scale):
                raise OverflowRisk("noise exceeds the headroom reserved in the encoding; raise `noise_headroom`")
            integers += noise.astype(np.int64)
        return self.to_ring(integers)

    def _l2_factor(self, x: np.ndarray) -> float | None:
        """The factor that scales ``x`` down to L2 norm ``clip``, or None if it is within it."""
        if x.dtype == np.float64:
            norm = float(np.linalg.norm(x))
        else:  # float32: square and sum in float64, a chunk at a time (no float64 copy of x)
            norm = math.sqrt(sum(
                float(np.dot(part, part)) for part in
                (x[i:i + ENCODE_CHUNK].astype(np.float64) for i in range(0, x.shape[0], ENCODE_CHUNK))
            ))
        return self.clip / norm if norm > self.clip else None

    def to_ring(self, integers: np.ndarray) -> np.ndarray:
        """Signed integers -> residues mod 2^bits stored as uint32."""
        return (integers.astype(np.int64) & (self.modulus - 1)).astype(np.uint32)

    def decode_sum(self, residues: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Residues of a sum of encodings -> float sum (centred lift, then unscale).

        The centred lift is a sign extension: shift the residue's top bit into bit 31 and
        read the word as int32 (an arithmetic shift back brings it down). Works through
        ``ENCODE_CHUNK`` entries at a time, so the only full-size array is the float64
        output: ``out`` when given. ``residues`` may lie in the upper half of ``out``'s
        own bytes (see :func:`sum_in_result_buffer`): entry i is read before any write
        reaches its bytes, so the sum and its decoding take 8 bytes an entry, not 12.
        """
        r = np.asarray(residues)
        if r.dtype != np.uint32:
            r = (r.astype(np.int64) & (self.modulus - 1)).astype(np.uint32)
        if out is None:
            out = np.empty(r.shape[0], dtype=np.float64)
        elif out.dtype != np.float64 or out.shape != r.shape:
            raise InputError(f"decode_sum writes a float64 vector of {r.shape[0]} entries")
        shift = 32 - self.bits
        for start in range(0, r.shape[0], ENCODE_CHUNK):
            part = r[start:start + ENCODE_CHUNK]
            if shift:
                signed = (part << np.uint32(shift)).view(np.int32) >> shift
            else:
                signed = part.view(np.int32)
            out[start:start + ENCODE_CHUNK] = signed / self.scale  # a new chunk, then written: overlap-safe
        return out


def sum_in_result_buffer(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A float64 result vector and a zeroed uint32 sum living in the upper half of its bytes.

    A server sums residues (4 bytes an entry) and finally decodes them to float64 (8
    bytes); with the sum stored where the result's second half goes, decoding in
    ascending order (:meth:`FixedPointCodec.decode_sum` with ``out=result``) overwrites
    only entries it has read, and the pages of the first half are not touched (so not
    resident) until decoding writes them: 4 bytes an entry while collecting, 8 at the end.
    """
    result = np.empty(dim, dtype=np.float64)
    total = result.view(np.uint32)[dim:]
    total[:] = 0
    return result, total


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
    """Return ``x`` as a 1-D float array or raise :class:`InputError` explaining why not.

    float32 and float64 vectors are returned as they are (no copy: a model's float32
    update is never doubled in memory); any other numeric type becomes float64.
    """
    try:
        arr = np.asarray(x)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError("update must be a numeric vector") from None
    if arr.ndim != 1:
        raise InputError(f"update must be a 1-D vector, got shape {arr.shape}; flatten it first")
    if dim is not None and arr.shape[0] != dim:
        raise InputError(f"update has {arr.shape[0]} entries, the round expects {dim}")
    bad = sum(int(np.count_nonzero(~np.isfinite(arr[i:i + ENCODE_CHUNK])))
              for i in range(0, arr.shape[0], ENCODE_CHUNK))
    if bad:
        raise InputError(f"update contains {bad} NaN/inf values; fix the local training step (lower lr, clip)")
    return arr


def _uniform01(seed: bytes, offset: int, count: int) -> np.ndarray:
    """Uniform [0,1) doubles (53-bit resolution): entries ``offset..offset+count`` of the seed's rounding stream."""
    words = expand_uint64(seed, count, label=b"rounding", offset=offset)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
