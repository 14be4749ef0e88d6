import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import shamir
from secagg.errors import ConfigError, InvalidShare


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 25).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=5),
    st.randoms(use_true_random=False),
)
def test_any_t_shares_reconstruct_every_secret(n_t, secrets, rnd):
    n, t = n_t
    holders = rnd.sample(range(1, 10_000), n)
    shares = shamir.split(secrets, threshold=t, holders=holders)
    chosen = rnd.sample(range(n), t)
    recovered = shamir.reconstruct([holders[i] for i in chosen], shares[chosen], secret_bytes=32)
    assert recovered == secrets


def test_odd_secret_lengths_round_trip():
    secrets = [os.urandom(7), os.urandom(7)]
    shares = shamir.split(secrets, threshold=3, holders=[1, 2, 3, 4])
    assert shamir.reconstruct([2, 3, 4], shares[1:], secret_bytes=7) == secrets


def test_fewer_than_t_shares_are_uniform_whatever_the_secret():
    # t-1 shares of the all-zero secret and of the all-0xff secret look alike (perfect secrecy).
    def first_share_limbs(secret):
        return np.concatenate([shamir.split([secret], threshold=3, holders=[1, 2, 3])[0, 0] for _ in range(300)])

    for secret in (bytes(32), b"\xff" * 32):
        limbs = first_share_limbs(secret)
        counts = np.bincount(limbs >> 27, minlength=16)  # top 4 of 31 bits
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        # 15 degrees of freedom: P(chi2 > 79.2) = 1e-10 for uniform limbs, so the two checks
        # fail falsely with probability below 1e-9.
        assert chi2 < 79.2


def test_share_serialisation_round_trips_and_rejects_bad_sizes():
    shares = shamir.split([os.urandom(32)], threshold=2, holders=[5, 9])
    blob = shamir.encode_share(shares[0, 0])
    assert len(blob) == shamir.share_bytes(32)
    np.testing.assert_array_equal(shamir.decode_share(blob, secret_bytes=32), shares[0, 0])
    with pytest.raises(InvalidShare):
        shamir.decode_share(blob[:-1], secret_bytes=32)
    with pytest.raises(InvalidShare):
        shamir.decode_share(b"\xff" * len(blob), secret_bytes=32)


def test_lagrange_weights_are_cached_per_holder_set():
    shamir.lagrange_at_zero.cache_clear()
    holders = tuple(range(1, 40))
    shamir.lagrange_at_zero(holders)
    shamir.lagrange_at_zero(holders)
    info = shamir.lagrange_at_zero.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    # Weights interpolate: sum of weights * x^k at 0 is 1 for k=0 and 0 otherwise.
    weights = shamir.lagrange_at_zero(holders)
    assert sum(weights) % shamir.PRIME == 1
    assert sum(w * x for w, x in zip(weights, holders)) % shamir.PRIME == 0


@pytest.mark.parametrize("kwargs", [dict(threshold=0), dict(threshold=4), dict(holders=[1, 1, 2]), dict(holders=[0, 1, 2])])
def test_bad_parameters(kwargs):
    params = dict(threshold=2, holders=[1, 2, 3]) | kwargs
    with pytest.raises(ConfigError):
        shamir.split([os.urandom(32)], **params)


def _horner(xs, coefficients):
    acc = np.zeros((len(xs), coefficients.shape[1]), dtype=np.int64)
    for k in range(coefficients.shape[0] - 1, -1, -1):
        acc = (acc * np.asarray(xs, dtype=np.int64)[:, None] + coefficients[k]) % shamir.PRIME
    return acc


@pytest.mark.parametrize("n,t", [(1, 1), (5, 3), (40, 40), (319, 251), (1000, 667)])
def test_vandermonde_product_equals_horner_evaluation(n, t):
    rng = np.random.default_rng(n * 1000 + t)  # test data: public points and coefficients
    xs = np.unique(rng.integers(1, shamir.PRIME, n))
    coefficients = rng.integers(0, shamir.PRIME, (t, 22), dtype=np.int64)
    np.testing.assert_array_equal(shamir.evaluate(xs, coefficients), _horner(xs, coefficients))
    # The largest values every float64 partial sum can meet: all powers and coefficients p - 1.
    top = np.full((t, 3), shamir.PRIME - 1, dtype=np.int64)
    high = np.array([shamir.PRIME - 1, shamir.PRIME - 2, 1 << 30][: max(1, min(3, n))], dtype=np.int64)
    np.testing.assert_array_equal(shamir.evaluate(high, top), _horner(high, top))


def test_power_rows_kept_across_holder_sets_give_the_same_evaluation():
    """Each x's powers are kept per threshold; sets that share x's (sparse-graph neighbourhoods
    drawn from one id range), in any order, still evaluate exactly like Horner's rule."""
    rng = np.random.default_rng(3)  # test data
    coefficients = rng.integers(0, shamir.PRIME, (40, 6), dtype=np.int64)
    for _ in range(5):
        xs = rng.permutation(np.arange(1, 120))[:70]  # overlapping sets, unsorted
        np.testing.assert_array_equal(shamir.evaluate(xs, coefficients), _horner(xs, coefficients))
    shamir._vandermonde.cache_clear()
    shamir._POWER_ROWS.clear()
    np.testing.assert_array_equal(shamir.evaluate(xs, coefficients), _horner(xs, coefficients))


@pytest.mark.parametrize("t", [1, 2, 3, 64, 251])
def test_vectorised_lagrange_weights_equal_the_textbook_formula(t):
    rng = np.random.default_rng(t)  # public points, test data
    holders = tuple(sorted(set(rng.integers(1, shamir.PRIME, t).tolist()) | {shamir.PRIME - 1}))[-t:]
    assert shamir.lagrange_at_zero(holders) == shamir.lagrange_at(holders, 0)


def test_batched_lagrange_weights_equal_one_set_at_a_time(monkeypatch):
    rng = np.random.default_rng(3)  # public points, test data
    sets = [tuple(sorted(rng.choice(np.arange(1, 2000), size, replace=False).tolist()))
            for size in (1, 2, 5, 5, 5, 5, 5, 163, 163, 251, 5)]
    sets.append((1, shamir.PRIME - 1))  # the largest holder id next to the smallest
    monkeypatch.setattr(shamir, "_LAGRANGE_BATCH_ENTRIES", 60)  # batches of two 5-point sets: crosses batch edges
    batched = shamir.lagrange_at_zero_many(sets)
    assert [tuple(w.tolist()) for w in batched] == [shamir.lagrange_at(xs, 0) for xs in sets]
    with pytest.raises(ConfigError):
        shamir.lagrange_at_zero_many([(3, 3)])


def test_interpolation_with_given_weights_recovers_the_secret():
    secrets = [os.urandom(32) for _ in range(3)]
    holders = tuple(range(1, 9))
    shares = shamir.split(secrets, threshold=5, holders=holders)
    chosen = (2, 4, 5, 7, 8)
    stacked = np.stack([shares[holders.index(h)] for h in chosen])
    weights = shamir.lagrange_at_zero_many([chosen])[0]
    limbs = shamir.interpolate_at_zero(chosen, stacked, secret_bytes=32, weights=weights)
    assert shamir.secrets_from_limbs(limbs, 32) == secrets
    with pytest.raises(ConfigError):
        shamir.interpolate_at_zero(chosen, stacked, secret_bytes=32, weights=weights[:4])
