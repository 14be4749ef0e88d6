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

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

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
        seed = labelled_seed(seed, label)
    return expand_uint32(seed, 2 * count, offset=2 * offset).view("<u8")


def labelled_seed(seed: bytes, label: bytes) -> bytes:
    """The seed of ``seed``'s stream for one purpose (``expand_uint64(seed, label=...)`` reads it)."""
    return derive(seed, label=b"secagg/v1/prg|" + label, context=b"")


class KeystreamReader:
    """Consecutive uint64 entries of a seed's stream, from entry ``offset`` on, into one reused buffer.

    What ``expand_uint64`` returns, read piece by piece: :meth:`next` gives the following
    ``count`` entries as a view of a buffer the reader owns (valid until its next call),
    so a loop over cache-sized pieces allocates nothing and the keystream stays in cache.
    ``offset`` must be even (two entries are one AES block).
    """

    def __init__(self, seed: bytes, *, offset: int = 0, capacity: int) -> None:
        if not 0 < capacity * 8 <= len(_ZEROS):
            raise ConfigError(f"a keystream reader holds 1 to {len(_ZEROS) // 8} entries at a time, not {capacity}")
        self._cipher = _keystream_cipher(seed, 2 * offset)
        self._raw = bytearray((2 * capacity + _BLOCK_SLACK) * 4)
        self._words = np.frombuffer(self._raw, dtype="<u8")

    def next(self, count: int) -> np.ndarray:
        """The next ``count`` entries (at most the capacity), writable, in the reader's buffer."""
        self._cipher.update_into(_ZEROS[: count * 8], self._raw)
        return self._words[:count]


#: entries of the vector worked on at once by :class:`MaskAccumulator` (256 KiB: the chunk and its
#: keystream stay in a core's L2 cache while every seed is added)
MASK_CHUNK_ELEMENTS = 1 << 16
#: seeds whose ciphers are live at once in one pass over the vector
SEEDS_PER_PASS = 256
#: a worker thread gets at least this many entries (1 MiB of keystream); below it, one thread
#: is faster than starting several
MIN_ELEMENTS_PER_WORKER = 1 << 18


#: ``fill(start)`` -> a writer of the starting values of entries start, start+1, ... into the chunks it is handed
ChunkFill = Callable[[int], Callable[[np.ndarray], None]]


def check_workers(workers: object) -> int:
    """``workers`` as a thread count; a ConfigError that says what to pass otherwise."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number >= 1 (1: serial; os.cpu_count(): every core), got {workers!r}")
    return workers


class MaskAccumulator:
    """Adds and subtracts seed-expanded masks into one uint32 vector, mod 2^32.

    Each seed's keystream is written straight into one reused scratch chunk
    (``update_into``) and added from there, so masking d parameters with m seeds costs m
    AES-CTR passes and m vector adds, with no per-seed allocation. ``copy=False`` lets
    the accumulator take over ``initial`` (e.g. a freshly encoded update) instead of
    copying it.

    ``workers`` (default 1) is the number of threads :meth:`add_many` may use. The vector
    is cut into one contiguous slice per thread, at AES-block boundaries; a thread
    generates every seed's keystream for its own slice only (CTR starts at the slice's
    offset) and adds it there. No two threads touch the same entry, and each entry gets
    the same keystream words added in the same order as on one thread, so the result is
    bit-identical to the serial path whatever the thread count. numpy's add, and in recent
    pyca/cryptography releases AES-CTR's ``update_into`` on buffers of 2 KiB or more, run
    with the GIL released, so the threads can use separate cores (where a release holds the
    GIL, they take turns: the same result, only not faster). Key agreement (X25519) holds
    the GIL, so the seeds are agreed before the threads start.
    """

    def __init__(self, dim: int, *, initial: np.ndarray | None = None, copy: bool = True, workers: int = 1) -> None:
        if dim < 0:
            raise ConfigError("dimension must be non-negative")
        self.dim = dim
        self.workers = check_workers(workers)
        if initial is None:
            self.value = np.zeros(dim, dtype=np.uint32)
        else:
            if initial.dtype != np.uint32 or initial.shape != (dim,):
                raise ConfigError("initial accumulator must be a uint32 vector of the round's dimension")
            self.value = initial.copy() if copy else initial

    def add(self, seed: bytes, sign: int = 1) -> None:
        """value += sign * PRG(seed) (mod 2^32); sign is +1 or -1."""
        self.add_many([(seed, sign)])

    def add_many(self, masks: Sequence[tuple[bytes, int]], *, fill: ChunkFill | None = None) -> None:
        """value += sum of sign * PRG(seed) over ``masks`` (seed, sign) pairs, on up to ``workers`` threads.

        ``fill``, when given, first writes each chunk's starting value, just before the masks
        are added to it (``fill(start)`` returns a writer that fills the chunks it is handed,
        in order, with entries ``start, start+1, ...``; ``start`` is a multiple of 4). The
        client encodes its update this way: each chunk is encoded and masked while it is in
        cache, and the encoding is split over the threads with the masks.
        """
        ops = [(seed, _op(sign)) for seed, sign in masks]  # every sign checked before any work
        threads = max(1, min(self.workers, self.dim // MIN_ELEMENTS_PER_WORKER))
        if threads == 1:
            self._add_range(ops, 0, self.dim, fill)
            return
        step = -(-self.dim // (4 * threads)) * 4  # a multiple of 4 entries: one AES block
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="secagg-mask") as pool:
            # list(): re-raises a worker's error
            list(pool.map(lambda start: self._add_range(ops, start, min(start + step, self.dim), fill),
                          range(0, self.dim, step)))

    def _add_range(self, ops: list[tuple[bytes, np.ufunc]], start: int, stop: int, fill: ChunkFill | None) -> None:
        """value[start:stop] op= PRG(seed)[start:stop] for every (seed, op), one chunk of the vector at a time.

        Chunk-major: a chunk of ``value`` stays in cache while the keystream of every seed
        of a batch is added to it, so the vector crosses the memory bus once per batch, not
        once per seed (1.6x faster at d = 10^6 with 40 seeds in one measurement, close to the
        keystream alone). A batch's ciphers are set up, and its seeds checked, before any of
        them is added; batches bound the cipher contexts alive at once (a server at N = 1,000
        may rebuild 10^5 masks).
        """
        raw = bytearray((MASK_CHUNK_ELEMENTS + _BLOCK_SLACK) * 4)
        words = np.frombuffer(raw, dtype="<u4")
        write = None if fill is None else fill(start)
        for first in range(0, max(len(ops), 1), SEEDS_PER_PASS):
            ciphers = [(_keystream_cipher(seed, start), op) for seed, op in ops[first:first + SEEDS_PER_PASS]]
            for begin in range(start, stop, MASK_CHUNK_ELEMENTS):
                n = min(MASK_CHUNK_ELEMENTS, stop - begin)
                part, zeros, keystream = self.value[begin:begin + n], _ZEROS[: n * 4], words[:n]
                if write is not None and first == 0:  # the first pass over the chunk starts from its filled value
                    write(part)
                for enc, op in ciphers:
                    enc.update_into(zeros, raw)
                    op(part, keystream, out=part)


def _op(sign: int) -> np.ufunc:
    if sign not in (1, -1):
        raise ConfigError("mask sign must be +1 or -1")
    return np.add if sign == 1 else np.subtract
