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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from secagg.errors import ConfigError, InputError, OverflowRisk
from secagg.prg import KeystreamReader, labelled_seed

CLIP_MODES = ("l2", "coordinate")
ENCODE_CHUNK = 1 << 18  # entries checked or decoded per pass: 2 MiB float64 temporaries
#: entries encoded at once into preallocated scratch (800 KiB: L2 and L3-resident); smaller blocks
#: pay more in per-call overhead than they save in cache misses (CPU per 10^6 float32 entries,
#: best of 12: 6.0 ms at 2^13, 5.2 ms at 2^14, 4.6 ms at 2^15)
ENCODE_BLOCK = 1 << 15
#: the label of the rounding stream: ``expand_uint64(seed, label=ROUNDING_LABEL)`` is the rounding words
ROUNDING_LABEL = b"rounding"
#: rounding words are 64-bit; their top 53 bits are a uniform double in [0, 1): u = (w >> 11) / 2^53
_UNIFORM_SHIFT = np.uint64(11)
_TWO_53 = float(1 << 53)
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

        One pass over the vector, ``ENCODE_BLOCK`` entries at a time (see
        :class:`Encoding`). ``out`` (a uint32 vector of the same length) receives the
        residues, e.g. the slot of a message being built, instead of a new array.
        """
        encoding = self.encoding(x, rounding_seed=rounding_seed, integer_noise=integer_noise)
        if out is None:
            out = np.empty(encoding.dim, dtype=np.uint32)
        elif out.dtype != np.uint32 or out.shape != (encoding.dim,):
            raise InputError(f"the output of encode must be a uint32 vector of {encoding.dim} entries")
        encoding.writer(0)(out)
        return out

    def encoding(
        self, x: np.ndarray, *, rounding_seed: bytes | None = None, integer_noise: np.ndarray | None = None
    ) -> Encoding:
        """``x`` checked and ready to be encoded a chunk at a time, from any even offset (see :class:`Encoding`).

        Everything that can refuse the input is checked here, before any entry is encoded:
        the vector, and integer noise beyond the headroom the codec reserved for it.
        """
        x = check_vector(x)
        if integer_noise is not None:
            integer_noise = np.asarray(integer_noise)
            if integer_noise.shape != x.shape or not np.issubdtype(integer_noise.dtype, np.integer):
                raise InputError(f"integer noise must be an integer vector of {x.shape[0]} entries")
            bound = self.headroom * self.scale
            for i in range(0, x.shape[0], ENCODE_CHUNK):
                part = integer_noise[i:i + ENCODE_CHUNK]
                if np.any(part > bound) or np.any(part < -bound):  # no abs(): abs(int64 min) < 0
                    raise OverflowRisk("noise exceeds the headroom reserved in the encoding; raise `noise_headroom`")
        factor = None if self.clip_mode == "coordinate" else self._l2_factor(x)
        seed = rounding_seed if rounding_seed is not None else os.urandom(32)
        return Encoding(self, x, factor, labelled_seed(seed, ROUNDING_LABEL), integer_noise)

    def _l2_factor(self, x: np.ndarray) -> float | None:
        """The factor that scales ``x`` down to L2 norm ``clip``, or None if it is within it.

        The squares are taken in float64 (exact for float32 entries) and summed by numpy's
        pairwise sum, ``ENCODE_CHUNK`` entries at a time in one scratch buffer. Not a BLAS
        dot: a multithreaded BLAS waits for its threads when the cores are busy (48 ms
        against 0.5 ms at d = 10^6 on 2 loaded cores).
        """
        scratch = np.empty(min(ENCODE_CHUNK, x.shape[0]), dtype=np.float64)
        total = 0.0
        for i in range(0, x.shape[0], ENCODE_CHUNK):
            part = x[i:i + ENCODE_CHUNK]
            squares = np.multiply(part, part, out=scratch[:part.shape[0]], dtype=np.float64)
            total += float(np.add.reduce(squares))
        norm = math.sqrt(total)
        return self.clip / norm if norm > self.clip else None

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


class Encoding:
    """One update's encoding, produced a chunk at a time (:meth:`FixedPointCodec.encoding`).

    Entry i encodes as, in float64 (the reference definition, which the tests check
    exactly)::

        v = clip(x[i]) * scale             # coordinate mode; l2: (x[i] * factor) * scale
        f = floor(v)
        u = (w[i] >> 11) / 2^53            # w = the seed's rounding stream (uint64 words)
        residue = (f + (u < v - f) + noise[i]) mod 2^bits

    P(u < v - f) = v - f, so E[f + (u < v - f)] = v: the rounding is unbiased (to 2^-53).
    A :meth:`writer` works through its chunks ``ENCODE_BLOCK`` entries at a time with its
    own preallocated scratch: no temporary of the whole vector, and each block's float64
    values, rounding words and residues are in cache from one step to the next. The
    rounding stream is read from the writer's offset, so writers that start at different
    (even) offsets, e.g. one per mask thread, together write what one writer would.
    """

    def __init__(self, codec: FixedPointCodec, x: np.ndarray, factor: float | None, rounding_seed: bytes,
                 noise: np.ndarray | None) -> None:
        self.codec = codec
        self.dim = x.shape[0]
        self._x = x
        self._factor = factor
        self._rounding_seed = rounding_seed
        self._noise = noise

    def writer(self, start: int) -> Callable[[np.ndarray], None]:
        """A function that writes the residues of entries ``start, start+1, ...`` into each uint32 chunk it
        is handed, in order (``start`` even: two rounding words are one AES block)."""
        if start % 2 or not 0 <= start <= self.dim:
            raise ConfigError(f"an encoding writer starts at an even entry within 0..{self.dim}, got {start}")
        rounding = KeystreamReader(self._rounding_seed, offset=start, capacity=ENCODE_BLOCK)
        scaled = np.empty(ENCODE_BLOCK, dtype=np.float64)
        floor = np.empty(ENCODE_BLOCK, dtype=np.float64)
        up = np.empty(ENCODE_BLOCK, dtype=np.bool_)
        position = start

        def write(out: np.ndarray) -> None:
            nonlocal position
            if position + out.shape[0] > self.dim:
                raise ConfigError(f"an encoding writer was asked for entries beyond the update's {self.dim}")
            for begin in range(0, out.shape[0], ENCODE_BLOCK):
                n = min(ENCODE_BLOCK, out.shape[0] - begin)
                self._block(out[begin:begin + n], position, rounding.next(n), scaled[:n], floor[:n], up[:n])
                position += n

        return write

    def _block(self, out: np.ndarray, at: int, words: np.ndarray, scaled: np.ndarray, floor: np.ndarray,
               up: np.ndarray) -> None:
        """Entries ``at .. at+len(out)`` into ``out``; ``words`` are their rounding words (overwritten)."""
        codec, x = self.codec, self._x[at:at + out.shape[0]]
        if codec.clip_mode == "coordinate":
            np.clip(x, -codec.clip, codec.clip, out=scaled, dtype=np.float64)
        elif self._factor is not None:
            np.multiply(x, self._factor, out=scaled, dtype=np.float64)
        else:
            np.copyto(scaled, x)
        np.multiply(scaled, codec.scale, out=scaled)
        np.floor(scaled, out=floor)
        np.subtract(scaled, floor, out=scaled)  # the fraction v - f, in [0, 1]
        np.multiply(scaled, _TWO_53, out=scaled)  # exact (a power of two): u < v - f  <=>  w >> 11 < (v - f) 2^53
        np.right_shift(words, _UNIFORM_SHIFT, out=words)
        np.less(words, scaled, out=up)  # compared as float64: w >> 11 < 2^53 converts exactly
        # |f| + 1 < 2^31 (the codec's range check), so f converts to int32 exactly; int32 addition
        # wraps mod 2^32, a multiple of 2^bits, so the low bits are the residue.
        signed = out.view(np.int32)
        np.copyto(signed, floor, casting="unsafe")
        np.add(signed, up, out=signed)
        if self._noise is not None:
            np.add(signed, self._noise[at:at + out.shape[0]], out=signed, dtype=np.int64, casting="unsafe")
        if codec.bits < 32:
            np.bitwise_and(out, np.uint32(codec.modulus - 1), out=out)
