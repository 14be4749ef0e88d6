"""DP-FedAvg pieces: update clipping, Gaussian noise on the sum, round events."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import privacy
from privacy.dpfedavg import add_gaussian_noise, clip_update, round_event
from secagg.errors import ConfigError, InputError


def test_clip_update_bounds_norm_and_keeps_direction():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        u = rng.normal(size=300) * scale
        clipped, norm = clip_update(u, 1.5)
        assert norm == pytest.approx(np.linalg.norm(u))
        assert np.linalg.norm(clipped) <= 1.5 + 1e-12
        if norm <= 1.5:
            assert np.array_equal(clipped, u)
        else:
            assert np.allclose(clipped / np.linalg.norm(clipped), u / norm)
    with pytest.raises(InputError, match="NaN"):
        clip_update(np.array([1.0, np.nan]), 1.0)


def test_gaussian_noise_from_os_urandom_has_the_right_law():
    agg = np.zeros(250_000)
    noisy = add_gaussian_noise(agg, noise_multiplier=1.3, clip_norm=0.5)
    assert noisy.shape == agg.shape
    # Kolmogorov-Smirnov against N(0, 0.65^2): a true law gives p-value <= 1e-10 with probability
    # 1e-10, a false-failure rate below 1e-9. 250k draws keep the power of the former 100k draws
    # at p > 1e-4: the critical distance sqrt(ln(2/p) / 2n) is 0.0070 in both cases.
    assert stats.kstest(noisy, "norm", args=(0, 0.65)).pvalue > 1e-10
    assert not np.array_equal(noisy, add_gaussian_noise(agg, noise_multiplier=1.3, clip_norm=0.5))
    with pytest.raises(ConfigError, match="not be private"):
        add_gaussian_noise(agg, noise_multiplier=0.0, clip_norm=1.0)


def test_round_event_accounts_as_user_level_sampled_gaussian():
    ev = round_event(noise_multiplier=1.0, client_sample_rate=0.01, clip_norm=0.1)
    assert ev.level.value == "user" and ev.steps == 1 and ev.clipping_norm == 0.1
    eps = privacy.Accountant("rdp").compose(ev, count=100).get_epsilon(1e-5)
    assert eps == pytest.approx(privacy.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100,
                                                delta=1e-5, accountant="rdp"))
