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


_noise_multiplier_for = noise_multiplier  # plan_budget's parameter of that name shadows the function


def plan_budget(
    *,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    sample_rate: float | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    accountants: tuple[AccountantName, ...] = ("prv",),
) -> dict:
    """`secagg plan`: epsilon per accountant for ``noise_multiplier``, or the smallest noise
    multiplier per accountant that meets ``target_epsilon`` (exactly one of the two).

    The sampling rate is ``sample_rate``, or ``batch_size / dataset_size``; the number of steps
    is ``steps``, or ``ceil(epochs / sampling rate)``. ``dataset_size`` also checks delta < 1/n.
    Returns sample_rate, steps, delta, dataset_size and either noise_multiplier with an
    ``epsilon`` mapping or target_epsilon with a ``noise_multiplier`` mapping.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError("give a noise multiplier (to get epsilon) or a target epsilon (to get the noise), not both")
    q, n_steps = _sampling(sample_rate, batch_size, dataset_size, steps, epochs)
    out: dict = {"sample_rate": q, "steps": n_steps, "delta": delta, "dataset_size": dataset_size}
    if noise_multiplier is not None:
        out["noise_multiplier"] = noise_multiplier
        out["epsilon"] = {a: epsilon(noise_multiplier=noise_multiplier, sample_rate=q, steps=n_steps, delta=delta,
                                     accountant=a, dataset_size=dataset_size) for a in accountants}
    else:
        out["target_epsilon"] = target_epsilon
        out["noise_multiplier"] = {a: _noise_multiplier_for(
            target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=n_steps, accountant=a,
            dataset_size=dataset_size) for a in accountants}
    return out


def _sampling(sample_rate: float | None, batch_size: int | None, dataset_size: int | None,
              steps: int | None, epochs: float | None) -> tuple[float, int]:
    """(sampling rate, steps) from the ways a user may state them."""
    if sample_rate is not None:
        if batch_size is not None:
            raise ConfigError("give --sample-rate or --batch-size with --dataset-size, not both")
        q = sample_rate
    elif batch_size is not None and dataset_size is not None:
        if batch_size <= 0 or dataset_size <= 0:
            raise ConfigError("--batch-size and --dataset-size must be positive")
        q = batch_size / dataset_size
    else:
        raise ConfigError("missing sampling rate: give --sample-rate Q, or --batch-size B --dataset-size N")
    if steps is not None and epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if steps is not None:
        return q, steps
    if epochs is None:
        raise ConfigError("missing length: give --steps N or --epochs E")
    if not (epochs > 0) or not (0 < q <= 1):
        raise ConfigError("--epochs must be > 0 and the sampling rate in (0, 1]")
    return q, math.ceil(epochs / q)
