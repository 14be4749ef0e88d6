"""Budget planner: the noise multiplier (or number of steps) that meets a target epsilon.

Accountant-agnostic: epsilon is monotone decreasing in the noise multiplier and
increasing in the number of steps, so both are found by bisection over
:func:`privacy.accountant.epsilon` (the approach of
``dp_accounting.mechanism_calibration``). The returned noise multiplier is on the safe
side: its epsilon is <= the target.
"""

from __future__ import annotations

import math

from privacy._checks import (
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)
from privacy.accountant import AccountantName, check_accountant, epsilon
from secagg.errors import ConfigError

_SIGMA_MIN = 0.05
_SIGMA_MAX = 1e4


def noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "prv",
    dataset_size: int | None = None,
    tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier (within ``tolerance``, relative) with epsilon <= target."""
    target_epsilon = check_epsilon(target_epsilon, name="target_epsilon")
    delta = check_delta(delta, dataset_size=dataset_size)
    sample_rate = check_sample_rate(sample_rate)
    steps = check_steps(steps)
    check_accountant(accountant)
    if steps == 0:
        return 0.0

    def eps(sigma: float) -> float:
        return epsilon(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
            accountant=accountant,
        )

    lo, hi = 0.5, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > _SIGMA_MAX:
            raise ConfigError(
                f"no noise multiplier up to {_SIGMA_MAX:g} reaches epsilon={target_epsilon} with "
                f"delta={delta}, q={sample_rate}, steps={steps}; raise the target epsilon or "
                "lower the number of steps or the sampling rate"
            )
    if hi == 1.0:
        lo = hi / 2
        while lo > _SIGMA_MIN and eps(lo) <= target_epsilon:
            hi, lo = lo, lo / 2
        if lo <= _SIGMA_MIN:
            return hi
    # invariant: eps(lo) > target >= eps(hi). Brent's method on log(eps) vs log(sigma)
    # (smooth, monotone) converges in a handful of accountant calls; then step up until
    # the answer is on the safe side.
    from scipy.optimize import brentq

    cache: dict[float, float] = {}

    def f(log_sigma: float) -> float:
        if log_sigma not in cache:
            cache[log_sigma] = math.log(eps(math.exp(log_sigma))) - math.log(target_epsilon)
        return cache[log_sigma]

    root = brentq(f, math.log(lo), math.log(hi), xtol=tolerance / 4, rtol=1e-12)
    sigma = math.exp(root)
    while eps(sigma) > target_epsilon:
        sigma *= 1 + tolerance / 4
    return sigma


def max_steps(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    accountant: AccountantName = "prv",
    limit: int = 10_000_000,
) -> int:
    """Largest number of steps (rounds) whose epsilon stays <= ``target_epsilon``."""
    target_epsilon = check_epsilon(target_epsilon, name="target_epsilon")
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    sigma = check_noise_multiplier(noise_multiplier)
    check_accountant(accountant)
    if sigma == 0:
        return 0

    def eps(steps: int) -> float:
        return epsilon(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
            accountant=accountant,
        )

    if eps(1) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while eps(hi) <= target_epsilon:
        lo, hi = hi, hi * 2
        if hi > limit:
            return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo
