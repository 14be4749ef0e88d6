import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.errors import ConfigError
from secagg.prg import CHUNK_ELEMENTS, MaskAccumulator, expand_uint32


def test_matches_aes_ecb_of_the_counter_blocks():
    # Independent reference: AES-CTR keystream block i is AES_k(i) (big-endian 128-bit counter).
    seed = bytes(range(32))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    reference = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(4)))
    np.testing.assert_array_equal(expand_uint32(seed, 16), np.frombuffer(reference, dtype="<u4"))


def test_streaming_slices_agree_with_the_whole_stream():
    seed = os.urandom(32)
    whole = expand_uint32(seed, CHUNK_ELEMENTS * 2 + 100)
    np.testing.assert_array_equal(expand_uint32(seed, 40, offset=CHUNK_ELEMENTS - 20), whole[CHUNK_ELEMENTS - 20 : CHUNK_ELEMENTS + 20])


def test_full_uint32_range_and_roughly_uniform():
    values = expand_uint32(os.urandom(32), 1 << 20)
    # The top of the range is reachable. A uniform draw lands in the top 2^17 values with
    # probability 2^-15, so all 2^20 draws miss it with probability (1 - 2^-15)^(2^20) = e^-32,
    # about 1.3e-14: a false failure below 1e-9.
    assert values.max() >= 2**32 - 2**17
    counts = np.bincount(values >> 28, minlength=16)  # 16 buckets of 65536 expected each
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    # 15 degrees of freedom: P(chi2 > 79.2) = 1e-10 for a uniform source, so a false failure
    # is below 1e-9; a biased generator (e.g. one bucket 2 % heavy) exceeds it by far.
    assert chi2 < 79.2


def test_different_seeds_give_different_masks():
    assert not np.array_equal(expand_uint32(b"\x01" * 32, 64), expand_uint32(b"\x02" * 32, 64))


def test_accumulator_adds_and_cancels_across_chunks():
    dim = CHUNK_ELEMENTS + 1000
    base = np.arange(dim, dtype=np.uint32)
    seed_a, seed_b = os.urandom(32), os.urandom(32)
    acc = MaskAccumulator(dim, initial=base)
    acc.add(seed_a, 1)
    acc.add(seed_b, -1)
    expected = base + expand_uint32(seed_a, dim) - expand_uint32(seed_b, dim)
    np.testing.assert_array_equal(acc.value, expected)
    acc.add(seed_a, -1)
    acc.add(seed_b, 1)
    np.testing.assert_array_equal(acc.value, base)


def test_bad_seeds_and_signs_are_refused():
    with pytest.raises(ConfigError, match="32 bytes"):
        expand_uint32(b"short", 4)
    with pytest.raises(ConfigError, match="sign"):
        MaskAccumulator(4).add(os.urandom(32), 2)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_threaded_masks_are_bit_identical_to_the_serial_path(workers, monkeypatch):
    import secagg.prg as prg

    # Small slices (4 KiB per worker) so the threads really split a vector with ragged ends.
    monkeypatch.setattr(prg, "MIN_ELEMENTS_PER_WORKER", 1024)
    monkeypatch.setattr(prg, "MASK_CHUNK_ELEMENTS", 1000)  # several chunks per slice, not block aligned
    monkeypatch.setattr(prg, "SEEDS_PER_PASS", 2)  # and several passes of seeds
    dim = 8 * 1024 + 13
    base = np.arange(dim, dtype=np.uint32) * np.uint32(2654435761)
    masks = [(os.urandom(32), sign) for sign in (1, -1, 1, 1, -1)]
    serial = MaskAccumulator(dim, initial=base)
    for seed, sign in masks:
        serial.add(seed, sign)
    threaded = MaskAccumulator(dim, initial=base, workers=workers)
    threaded.add_many(masks)
    np.testing.assert_array_equal(threaded.value, serial.value)
    one = MaskAccumulator(dim, initial=base)
    one.add_many(masks)
    np.testing.assert_array_equal(one.value, serial.value)
    with pytest.raises(ConfigError, match="sign"):  # every sign is checked before any thread starts
        threaded.add_many([(os.urandom(32), 1), (os.urandom(32), 0)])
    np.testing.assert_array_equal(threaded.value, serial.value)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_filled_accumulator_equals_filling_first_then_adding_the_masks(workers, monkeypatch):
    from secagg import prg

    monkeypatch.setattr(prg, "MIN_ELEMENTS_PER_WORKER", 1024)
    monkeypatch.setattr(prg, "MASK_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(prg, "SEEDS_PER_PASS", 2)  # the fill comes before the first pass only
    dim = 4 * 1024 + 6
    base = np.arange(dim, dtype=np.uint32) * np.uint32(2654435761)
    starts = []

    def fill(start):
        starts.append(start)
        position = start

        def write(chunk):
            nonlocal position
            chunk[:] = base[position:position + chunk.shape[0]]
            position += chunk.shape[0]
        return write

    masks = [(os.urandom(32), sign) for sign in (1, -1, 1, -1, 1)]
    expected = MaskAccumulator(dim, initial=base)
    expected.add_many(masks)
    filled = MaskAccumulator(dim, initial=np.zeros(dim, dtype=np.uint32), copy=False, workers=workers)
    filled.add_many(masks, fill=fill)
    np.testing.assert_array_equal(filled.value, expected.value)
    assert len(starts) == min(workers, dim // 1024) and all(s % 4 == 0 for s in starts)
    only = MaskAccumulator(dim, workers=workers)
    only.add_many([], fill=fill)  # no masks: the fill alone
    np.testing.assert_array_equal(only.value, base)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_worker_counts_that_are_not_counts_are_refused(workers):
    with pytest.raises(ConfigError, match="workers"):
        MaskAccumulator(4, workers=workers)


def test_a_keystream_reader_reads_the_labelled_stream_piece_by_piece():
    from secagg.prg import KeystreamReader, expand_uint64, labelled_seed

    seed = os.urandom(32)
    whole = expand_uint64(seed, 50, label=b"rounding")
    reader = KeystreamReader(labelled_seed(seed, b"rounding"), offset=10, capacity=16)
    pieces = [reader.next(n).copy() for n in (16, 1, 7, 16)]  # copies: next() reuses its buffer
    np.testing.assert_array_equal(np.concatenate(pieces), whole[10:50])
    with pytest.raises(ConfigError, match="entries at a time"):
        KeystreamReader(seed, capacity=0)
