"""Hazardous materials -- use ``secagg.protocol`` instead.

Seed -> pseudorandom mask expansion with AES-256 in counter mode (pyca/cryptography,
AES-NI through OpenSSL). The full 32-byte seed is the AES key, so a mask has 256 bits of
seed entropy, and every uint32 value in [0, 2^32) is reachable and uniform (a uint32 is
four keystream bytes; no modulo bias, no truncation of the range).

Large vectors are processed in fixed-size chunks whose counter blocks are computed from
the element offset, so any slice of the mask can be produced independently (streaming)
and memory stays bounded whatever the dimension.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.errors import ConfigError
from secagg.keys import derive

SEED_BYTES = 32
CHUNK_ELEMENTS = 1 << 18  # 1 MiB of keystream per chunk: fits in L2, amortises call overhead
_ZEROS = memoryview(bytes(CHUNK_ELEMENTS * 4))  # a view, so slicing it copies nothing
_BLOCK_SLACK = 4  # update_into wants room for one more AES block (16 bytes) than it writes


def _keystream_cipher(seed: bytes, element_offset: int):
    if len(seed) != SEED_BYTES:
        raise ConfigError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    if element_offset % 4:
        raise ConfigError("PRG offsets must be multiples of 4 elements (one AES block)")
    counter = (element_offset // 4).to_bytes(16, "big")
    return Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()


def expand_uint32(seed: bytes, count: int, *, offset: int = 0) -> np.ndarray:
    """``count`` uniform uint32 values: elements ``offset .. offset+count`` of the seed's stream.

    One cipher runs through the whole range (CTR keeps its counter between calls) and
    writes its keystream straight into the result, chunk by chunk.
    """
    out = np.empty(count + _BLOCK_SLACK, dtype=np.uint32)
    target = memoryview(out).cast("B")
    enc = _keystream_cipher(seed, offset)
    for start in range(0, count, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, count - start)
        enc.update_into(_ZEROS[: n * 4], target[start * 4:])
    return out[:count]


def expand_uint64(seed: bytes, count: int, *, label: bytes = b"", offset: int = 0) -> np.ndarray:
    """``count`` uniform uint64 values, entries ``offset ..`` of the stream (for rounding, not masks)."""
    if label:
        seed = derive(seed, label=b"secagg/v1/prg|" + label, context=b"")
    return expand_uint32(seed, 2 * count, offset=2 * offset).view("<u8")


class MaskAccumulator:
    """Adds and subtracts seed-expanded masks into one uint32 vector, mod 2^32.

    One scratch buffer is reused for every seed, and each seed's keystream is written
    straight into it (``update_into``), so masking d parameters with m seeds costs m
    AES-CTR passes and m vector adds, with no per-seed allocation. ``copy=False`` lets
    the accumulator take over ``initial`` (e.g. a freshly encoded update) instead of
    copying it.
    """

    def __init__(self, dim: int, *, initial: np.ndarray | None = None, copy: bool = True) -> None:
        if dim < 0:
            raise ConfigError("dimension must be non-negative")
        self.dim = dim
        if initial is None:
            self.value = np.zeros(dim, dtype=np.uint32)
        else:
            if initial.dtype != np.uint32 or initial.shape != (dim,):
                raise ConfigError("initial accumulator must be a uint32 vector of the round's dimension")
            self.value = initial.copy() if copy else initial
        self._scratch = bytearray((CHUNK_ELEMENTS + _BLOCK_SLACK) * 4)
        self._scratch_view = np.frombuffer(self._scratch, dtype="<u4")

    def add(self, seed: bytes, sign: int = 1) -> None:
        """value += sign * PRG(seed) (mod 2^32); sign is +1 or -1."""
        if sign not in (1, -1):
            raise ConfigError("mask sign must be +1 or -1")
        op = np.add if sign == 1 else np.subtract
        enc = _keystream_cipher(seed, 0)
        for start in range(0, self.dim, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, self.dim)
            n = stop - start
            enc.update_into(_ZEROS[: n * 4], self._scratch)
            part = self.value[start:stop]
            op(part, self._scratch_view[:n], out=part)
