import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, InputError, OverflowRisk
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
