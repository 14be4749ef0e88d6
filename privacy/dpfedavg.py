"""User-level DP for federated averaging (DP-FedAvg, McMahan et al. 2018): the pieces.

One round, central noise (the server, or a trusted aggregator, adds the noise):

1. sample each client with probability ``q`` (Poisson, :func:`poisson_sample`, from
   ``os.urandom`` at round time) -- the engine does this;
2. each client clips its whole update to L2 norm ``clip_norm`` (:func:`clip_update`);
3. the aggregate *sum* of clipped updates gets Gaussian noise of std
   ``noise_multiplier * clip_norm`` (:func:`add_gaussian_noise`);
4. the round is one user-level event ``dpfedavg_event(noise_multiplier, q)`` in the ledger,
   reserved before step 3's output is released.

Under secure aggregation with no trusted party, use :mod:`privacy.distributed` instead
(each client adds a share of integer noise).

Noise is drawn from ``os.urandom`` (Box-Muller on 53-bit uniforms) unless a test passes
``rng``. Floating-point Gaussian samplers are open to the attacks of Mironov (2012) /
Jin et al. (2022) on the low-order bits; where that matters use the integer mechanisms.
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np

from privacy._checks import check_noise_multiplier, check_positive
from privacy.events import SampledGaussianEvent, dpfedavg_event
from secagg.errors import ConfigError, InputError


def _uniform53(size: int) -> np.ndarray:
    """``size`` uniform doubles in [0, 1), 53 bits each, from ``os.urandom``."""
    bits = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def poisson_sample(population: int, rate: float) -> list[int]:
    """Poisson sampling for user-level DP: each of ``population`` clients independently with
    probability ``rate``, drawn from ``os.urandom`` at call time.

    Amplification by sampling (the accountant's ``q < 1``) holds only if nobody can predict or
    learn who was sampled: the draw must never come from a public seed, and its outcome must
    not be published (the engine writes counts, not identities, to shared files).
    """
    if isinstance(population, bool) or not isinstance(population, int) or population < 0:
        raise ConfigError(f"population must be an integer >= 0, got {population!r}")
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"rate must lie in (0, 1], got {rate!r}")
    if population == 0:
        return []
    return [int(i) for i in np.flatnonzero(_uniform53(population) < rate)]


def fixed_sample(population: int, count: int) -> list[int]:
    """``count`` distinct clients out of ``population``, uniformly, from ``os.urandom``
    (sorted). A fixed-size cohort claims no amplification (the ledger records q = 1)."""
    if not 0 <= count <= population:
        raise ConfigError(f"cannot sample {count} of {population} clients")
    return sorted(secrets.SystemRandom().sample(range(population), count))


def clip_update(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``update`` down to L2 norm <= ``clip_norm``; return (clipped, original norm)."""
    clip_norm = check_positive(clip_norm, name="clip_norm")
    arr = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InputError("update contains NaN or infinity; refusing to clip it")
    norm = float(np.linalg.norm(arr))
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return arr * factor, norm


def _std_normal(size: int, rng: np.random.Generator | None) -> np.ndarray:
    if rng is not None:
        return rng.standard_normal(size)
    half = (size + 1) // 2
    bits = np.frombuffer(os.urandom(16 * half), dtype=np.uint64).reshape(2, half)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    r = np.sqrt(-2.0 * np.log(u[0]))
    theta = 2.0 * math.pi * u[1]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:size]


def add_gaussian_noise(
    aggregate: np.ndarray, *, noise_multiplier: float, clip_norm: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Return ``aggregate`` (a sum of clipped updates) + N(0, (z * clip_norm)^2) noise."""
    z = check_noise_multiplier(noise_multiplier)
    c = check_positive(clip_norm, name="clip_norm")
    arr = np.asarray(aggregate, dtype=np.float64)
    if z == 0:
        raise ConfigError("noise_multiplier=0 adds no noise: the release would not be private")
    return arr + (z * c) * _std_normal(arr.size, rng).reshape(arr.shape)


def round_event(
    *, noise_multiplier: float, client_sample_rate: float, clip_norm: float
) -> SampledGaussianEvent:
    """The ledger event of one DP-FedAvg round."""
    return dpfedavg_event(noise_multiplier=noise_multiplier, client_sample_rate=client_sample_rate,
                          rounds=1, clipping_norm=clip_norm)
