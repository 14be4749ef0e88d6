import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from secagg import encoding
from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, InputError, OverflowRisk
from secagg.prg import expand_uint64
from secagg.protocol.common import pack_residues, unpack_residues

finite = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda n: hnp.arrays(np.float64, (n, 17), elements=finite)),
    st.sampled_from([16, 24, 32]),
)
def test_sum_of_encodings_decodes_within_bound(updates, bits):
    n = updates.shape[0]
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=n, bits=bits, clip_mode="coordinate")
    total = np.zeros(updates.shape[1], dtype=np.uint64)
    for row in updates:
        total += codec.encode(row)
    decoded = codec.decode_sum(total % codec.modulus)
    assert np.max(np.abs(decoded - updates.sum(0))) <= codec.sum_error_bound(n) + 1e-12


def test_stochastic_rounding_is_unbiased():
    codec = FixedPointCodec(clip=1.0, scale=1.0, bits=16, max_clients=1, clip_mode="coordinate")
    x = np.full(20000, 0.3)
    decoded = codec.decode_sum(codec.encode(x))
    assert set(np.unique(decoded)) <= {0.0, 1.0}
    # sigma of the mean = sqrt(0.3 * 0.7 / 20000) = 0.0032; 0.0225 is 7 sigma, so a correct
    # (unbiased) rounding fails this with probability 2.6e-12, below 1e-9.
    assert abs(decoded.mean() - 0.3) < 0.0225


def test_l2_clipping_bounds_the_norm():
    codec = FixedPointCodec.for_clients(clip=2.0, max_clients=4)
    clipped = codec.clip_update(np.full(100, 1.0))
    assert np.linalg.norm(clipped) == pytest.approx(2.0)
    small = np.full(4, 0.1)
    np.testing.assert_array_equal(codec.clip_update(small), small)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad):
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=2)
    x = np.zeros(5)
    x[3] = bad
    with pytest.raises(InputError, match="NaN/inf"):
        codec.encode(x)


def test_wrong_shape_is_refused():
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=2)
    with pytest.raises(InputError, match="1-D"):
        codec.encode(np.zeros((2, 2)))


def test_overflow_is_an_error_not_a_wrap():
    with pytest.raises(OverflowRisk, match="use more bits"):
        FixedPointCodec(clip=1.0, scale=2.0**20, bits=16, max_clients=10)
    with pytest.raises(OverflowRisk):
        FixedPointCodec.for_clients(clip=1.0, max_clients=2**20, bits=16)


def test_for_clients_picks_a_safe_scale_that_survives_the_worst_case():
    n = 7
    codec = FixedPointCodec.for_clients(clip=3.0, max_clients=n, bits=20, clip_mode="coordinate")
    worst = np.full((n, 3), 3.0)
    total = sum(codec.encode(r).astype(np.uint64) for r in worst) % codec.modulus
    np.testing.assert_allclose(codec.decode_sum(total), worst.sum(0), atol=codec.sum_error_bound(n))
    total = sum(codec.encode(-r).astype(np.uint64) for r in worst) % codec.modulus
    np.testing.assert_allclose(codec.decode_sum(total), -worst.sum(0), atol=codec.sum_error_bound(n))


@pytest.mark.parametrize("kwargs", [dict(bits=40), dict(bits=4), dict(clip=-1.0), dict(clip=float("nan")), dict(clip_mode="l3")])
def test_bad_parameters_raise_config_errors(kwargs):
    params = dict(clip=1.0, scale=4.0, bits=32, max_clients=2, clip_mode="l2") | kwargs
    with pytest.raises(ConfigError):
        FixedPointCodec(**params)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([8, 12, 16, 20, 24, 31, 32]), st.integers(0, 50), st.data())
def test_residue_packing_round_trips(bits, dim, data):
    values = data.draw(hnp.arrays(np.uint32, dim, elements=st.integers(0, 2**bits - 1)))
    packed = pack_residues(values, bits)
    assert len(packed) == dim * ((bits + 7) // 8)
    np.testing.assert_array_equal(unpack_residues(packed, dim, bits), values)


# -- the streaming encoder against its definition, entry by entry --------------------------

def reference_encode(codec: FixedPointCodec, x: np.ndarray, seed: bytes, noise: np.ndarray | None) -> np.ndarray:
    """The encoding's definition, one Python float at a time (slow and plain on purpose).

    v = clip(x) * scale (l2: (x * factor) * scale), f = floor(v), u = (w >> 11) / 2^53 for
    the entry's 64-bit rounding word w; the residue is f + [u < v - f] + noise mod 2^bits.
    The l2 factor is the codec's own (its norm is checked by test_l2_clipping_bounds_the_norm);
    the rounding words are read in one piece from the stream (expand_uint64), not in blocks.
    """
    words = expand_uint64(seed, x.shape[0], label=b"rounding")
    factor = codec._l2_factor(x) if codec.clip_mode == "l2" else None
    out = []
    for i, value in enumerate(x.tolist()):  # float32 entries become the same doubles
        if codec.clip_mode == "coordinate":
            value = min(max(value, -codec.clip), codec.clip)
        elif factor is not None:
            value = value * factor
        v = value * codec.scale
        f = math.floor(v)
        u = (int(words[i]) >> 11) / 2**53  # exact: a 53-bit integer over a power of two
        integer = f + (u < v - f) + (0 if noise is None else int(noise[i]))
        out.append(integer % codec.modulus)
    return np.array(out, dtype=np.uint32)


def _edge_floats(clip: float, dtype: type) -> st.SearchStrategy[float]:
    """Entries of a test update: 0, +-clip, beyond the clip, tiny and subnormal magnitudes, and any."""
    edges = [0.0, -0.0, clip, -clip, 2 * clip, -3 * clip, 1e-30, -1e-30, 1e-300, 5e-324, -5e-324]
    width = 32 if dtype == np.float32 else 64
    return st.one_of(
        st.sampled_from([float(dtype(e)) for e in edges]),  # as the dtype holds them (0.1 is not a float32)
        st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, width=width),
        st.floats(-2.0**-20, 2.0**-20, allow_nan=False, allow_infinity=False, width=width),
    )


@settings(max_examples=150, deadline=None)
@given(
    clip_mode=st.sampled_from(["coordinate", "l2"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    bits=st.sampled_from([8, 16, 24, 31, 32]),
    clip=st.sampled_from([0.1, 0.3, 1.0, 3.0]),  # 0.1 and 0.3 are not float32 values
    with_noise=st.booleans(),
    block=st.integers(1, 9),
    data=st.data(),
)
def test_streaming_encoder_equals_the_reference_definition(clip_mode, dtype, bits, clip, with_noise, block, data):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoding, "ENCODE_BLOCK", block)  # many blocks, ragged ends
        _check_against_reference(clip_mode, dtype, bits, clip, with_noise, data)


def _check_against_reference(clip_mode, dtype, bits, clip, with_noise, data):
    x = data.draw(hnp.arrays(dtype, st.integers(1, 40), elements=_edge_floats(clip, dtype)))
    codec = FixedPointCodec.for_clients(clip=clip, max_clients=3, bits=bits, clip_mode=clip_mode,
                                        headroom=1.0 if with_noise else 0.0)
    bound = int(codec.headroom * codec.scale)
    noise = data.draw(hnp.arrays(np.int64, x.shape[0], elements=st.integers(-bound, bound))) if with_noise else None
    seed = data.draw(st.binary(min_size=32, max_size=32))
    expected = reference_encode(codec, x, seed, noise)
    np.testing.assert_array_equal(codec.encode(x, rounding_seed=seed, integer_noise=noise), expected)
    # Writers starting at any even entry (as mask threads do) write the same residues.
    cut = 2 * data.draw(st.integers(0, x.shape[0] // 2))
    parts = np.empty(x.shape[0], dtype=np.uint32)
    stream = codec.encoding(x, rounding_seed=seed, integer_noise=noise)
    stream.writer(cut)(parts[cut:])
    head = stream.writer(0)
    for start in range(0, cut, 3):  # the chunks of one writer come in any sizes
        head(parts[start:min(start + 3, cut)])
    np.testing.assert_array_equal(parts, expected)
    # The decoded value of each entry is within one step of the clipped input (no wrap-around).
    if not with_noise and clip_mode == "coordinate":
        decoded = codec.decode_sum(expected)
        assert np.all(np.abs(decoded - np.clip(x.astype(np.float64), -clip, clip)) <= codec.resolution)


def test_an_encoding_writer_starts_at_an_even_entry_and_stays_within_the_vector():
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=2)
    stream = codec.encoding(np.zeros(10, dtype=np.float32), rounding_seed=bytes(32))
    with pytest.raises(ConfigError, match="even entry"):
        stream.writer(3)
    write = stream.writer(8)
    with pytest.raises(ConfigError, match="beyond"):
        write(np.empty(4, dtype=np.uint32))
