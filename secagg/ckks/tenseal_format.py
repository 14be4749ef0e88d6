"""Strict structural check of TenSEAL vector bytes *before* TenSEAL or SEAL parses them.

TenSEAL's ``CKKSVector``/``BFVVector`` serialisation is a protobuf message::

    field 1 (sizes, packed uint32)   -- number of values in each ciphertext
    field 2 (ciphertexts, bytes)     -- SEAL ``Ciphertext::save`` output, one per chunk
    field 3 (scale, double)          -- CKKS only

and each SEAL blob is a 16-byte ``SEALHeader`` (magic 0xA15E, header size, version,
compression mode, total size) followed by a zstd frame.

Feeding unchecked bytes to TenSEAL is unsafe: the ``sizes`` field is trusted by
``decrypt`` (a flipped varint made TenSEAL reserve gigabytes; a size above the slot count
reads past the end of a buffer), and SEAL inflates zstd streams into memory without a
bound, so a few kilobytes of RLE blocks can expand to gigabytes. This module therefore
accepts only the exact layout TenSEAL emits for *one* ciphertext holding *exactly* the
expected number of values at the expected scale, checks the SEAL header against the
blob, and walks the zstd block headers to bound the decompressed size, all in pure
Python and without decompressing anything. What passes here is then loaded by SEAL,
which validates the metadata (parameters id, size, degree) and the coefficient ranges.

Every failure raises :class:`~secagg.errors.InvalidCiphertext`.
"""

from __future__ import annotations

import struct

from secagg.errors import InvalidCiphertext

SEAL_MAGIC = 0xA15E
SEAL_HEADER_BYTES = 16
SEAL_VERSION_MAJOR = 4
COMPR_NONE, COMPR_ZSTD = 0, 2
ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 * 1024
# Bytes of a SEAL ciphertext besides its coefficients: parms_id, flags, sizes, scale,
# correction factor, the inner DynArray header and count; generous on purpose.
CIPHERTEXT_OVERHEAD = 512


def max_blob_bytes(raw_bytes: int) -> int:
    """Largest acceptable SEAL blob for a ciphertext whose coefficient data is ``raw_bytes``."""
    # zstd never expands by more than ~0.4% (+ block and frame headers); SEAL adds its header.
    return raw_bytes + raw_bytes // 128 + CIPHERTEXT_OVERHEAD + SEAL_HEADER_BYTES


def max_vector_bytes(raw_bytes: int) -> int:
    """Largest acceptable TenSEAL vector serialisation holding one such ciphertext."""
    return max_blob_bytes(raw_bytes) + 32


def check_serialized_vector(data: bytes, *, expected_size: int, raw_bytes: int, scale: float | None) -> None:
    """Raise InvalidCiphertext unless ``data`` is one TenSEAL vector of exactly this shape.

    ``expected_size`` is the number of values this chunk must hold (derived from the
    round's declared dimension, never from the message); ``raw_bytes`` the size of the
    coefficient data of one ciphertext at the data level; ``scale`` the CKKS scale the
    vector must declare, or None for BFV (whose message has no scale field).
    """
    if not isinstance(data, bytes):
        raise InvalidCiphertext("ciphertext chunk is not bytes")
    if len(data) > max_vector_bytes(raw_bytes):
        raise InvalidCiphertext(f"ciphertext chunk of {len(data)} bytes exceeds the bound for these parameters")
    pos = 0
    # field 1: packed sizes, exactly one varint equal to expected_size
    pos = _expect_byte(data, pos, 0x0A, "sizes tag")
    length, pos = _varint(data, pos)
    size, after = _varint(data, pos)
    if after - pos != length:
        raise InvalidCiphertext("ciphertext chunk must hold exactly one ciphertext")
    if size != expected_size:
        raise InvalidCiphertext(f"ciphertext chunk declares {size} values, the round expects {expected_size}")
    pos = after
    # field 2: one SEAL blob
    pos = _expect_byte(data, pos, 0x12, "ciphertext tag")
    length, pos = _varint(data, pos)
    if length > max_blob_bytes(raw_bytes) or pos + length > len(data):
        raise InvalidCiphertext("ciphertext blob length is out of bounds")
    _check_seal_blob(memoryview(data)[pos : pos + length], raw_bytes)  # no copy
    pos += length
    # field 3: the scale (CKKS only)
    if scale is not None:
        pos = _expect_byte(data, pos, 0x19, "scale tag")
        if pos + 8 > len(data):
            raise InvalidCiphertext("ciphertext chunk is truncated (scale)")
        (declared,) = struct.unpack_from("<d", data, pos)
        if declared != scale:
            raise InvalidCiphertext(f"ciphertext scale {declared!r} differs from the round's scale {scale!r}")
        pos += 8
    if pos != len(data):
        raise InvalidCiphertext("ciphertext chunk has trailing or unexpected fields")


def _check_seal_blob(blob: memoryview, raw_bytes: int) -> None:
    if len(blob) < SEAL_HEADER_BYTES:
        raise InvalidCiphertext("SEAL ciphertext is truncated (header)")
    magic, header_size, major, _minor, compr, reserved, size = struct.unpack_from("<HBBBBHQ", blob, 0)
    if magic != SEAL_MAGIC or header_size != SEAL_HEADER_BYTES or major != SEAL_VERSION_MAJOR or reserved:
        raise InvalidCiphertext("SEAL ciphertext header is invalid")
    if size != len(blob):
        raise InvalidCiphertext("SEAL ciphertext header size does not match its length")
    limit = raw_bytes + CIPHERTEXT_OVERHEAD
    if compr == COMPR_NONE:
        if len(blob) - SEAL_HEADER_BYTES > limit:
            raise InvalidCiphertext("SEAL ciphertext is too large")
        return
    if compr != COMPR_ZSTD:
        raise InvalidCiphertext("SEAL ciphertext uses an unsupported compression mode")
    # A genuine frame needs ceil(limit / 128 KiB) full blocks; a compressed block is counted
    # as a full 128 KiB whatever it regenerates, so allow one block more than that.
    if _zstd_bound(blob, SEAL_HEADER_BYTES) > (-(-limit // ZSTD_BLOCK_MAX) + 1) * ZSTD_BLOCK_MAX:
        raise InvalidCiphertext("SEAL ciphertext would decompress beyond the size of one ciphertext")


def _zstd_bound(buf: memoryview, pos: int) -> int:
    """Upper bound of the decompressed size of the single zstd frame at ``pos`` (RFC 8878).

    Walks the frame and block headers only. Raw and RLE blocks regenerate exactly their
    declared size; a compressed block regenerates at most 128 KiB. The frame must end
    exactly at the end of ``buf``; skippable frames, dictionaries and reserved bits are
    refused.
    """
    end = len(buf)
    if pos + 5 > end or struct.unpack_from("<I", buf, pos)[0] != ZSTD_MAGIC:
        raise InvalidCiphertext("SEAL ciphertext is not a zstd frame")
    pos += 4
    fhd = buf[pos]
    pos += 1
    fcs_flag, single_segment, reserved, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, (fhd >> 2) & 1, fhd & 3
    if reserved or dict_flag:
        raise InvalidCiphertext("zstd frame uses reserved bits or a dictionary")
    if not single_segment:
        pos += 1  # window descriptor
    pos += (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    total = 0
    while True:
        if pos + 3 > end:
            raise InvalidCiphertext("zstd frame is truncated")
        header = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
        pos += 3
        last, block_type, block_size = header & 1, (header >> 1) & 3, header >> 3
        if block_type == 0:  # raw
            pos += block_size
            total += block_size
        elif block_type == 1:  # RLE: one byte repeated block_size times
            pos += 1
            total += block_size
        elif block_type == 2:  # compressed
            if block_size > ZSTD_BLOCK_MAX:
                raise InvalidCiphertext("zstd block is oversized")
            pos += block_size
            total += ZSTD_BLOCK_MAX
        else:
            raise InvalidCiphertext("zstd frame has a reserved block type")
        if block_size > ZSTD_BLOCK_MAX or pos > end:
            raise InvalidCiphertext("zstd frame is truncated or has an oversized block")
        if last:
            break
    if checksum:
        pos += 4
    if pos != end:
        raise InvalidCiphertext("SEAL ciphertext has bytes after its zstd frame")
    return total


def _expect_byte(data: bytes, pos: int, value: int, what: str) -> int:
    if pos >= len(data) or data[pos] != value:
        raise InvalidCiphertext(f"ciphertext chunk is malformed ({what})")
    return pos + 1


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise InvalidCiphertext("ciphertext chunk is truncated (varint)")
        b = data[pos + i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if i and b == 0:
                raise InvalidCiphertext("ciphertext chunk has a non-canonical varint")
            return result, pos + i + 1
        shift += 7
    raise InvalidCiphertext("ciphertext chunk has an over-long varint")
