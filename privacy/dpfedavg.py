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

Noise (:func:`add_gaussian_noise`) is a discrete Gaussian on a grid of step
``gamma = clip_norm * 2**-GRID_BITS``, drawn from ``os.urandom`` (the exact integer sampler of
:mod:`privacy.distributed`) and added to the sum snapped to the same grid: every output is an
exact multiple of ``gamma``, so the low-order bits of a floating-point Gaussian, which the
attacks of Mironov (2012) / Jin et al. (2022) read, carry nothing. Snapping moves the sum by at
most ``gamma/2`` per coordinate, so the sensitivity grows to ``clip_norm + gamma sqrt(d)``:
:func:`effective_noise_multiplier` is what the ledger records. A test may pass ``rng``
(reproducible, not private).
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


#: The central noise grid is clip_norm * 2**-GRID_BITS.
GRID_BITS = 24


def grid_step(clip_norm: float) -> float:
    """Step of the grid the central noise and the noisy sum live on."""
    return check_positive(clip_norm, name="clip_norm") * 2.0**-GRID_BITS


def effective_noise_multiplier(*, noise_multiplier: float, clip_norm: float, dim: int) -> float:
    """The noise multiplier :func:`add_gaussian_noise` really gives: snapping the sum to the grid
    adds at most ``gamma sqrt(dim)`` to the L2 sensitivity ``clip_norm``."""
    z = check_noise_multiplier(noise_multiplier)
    c = check_positive(clip_norm, name="clip_norm")
    return z * c / (c + grid_step(c) * math.sqrt(max(int(dim), 1)))


def add_gaussian_noise(
    aggregate: np.ndarray, *, noise_multiplier: float, clip_norm: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Return ``aggregate`` (a sum of clipped updates) snapped to the grid plus discrete
    Gaussian noise of parameter ``z * clip_norm`` on the grid (see the module docstring)."""
    from privacy.distributed import _discrete_gaussian

    z = check_noise_multiplier(noise_multiplier)
    c = check_positive(clip_norm, name="clip_norm")
    arr = np.asarray(aggregate, dtype=np.float64)
    if z == 0:
        raise ConfigError("noise_multiplier=0 adds no noise: the release would not be private")
    gamma = grid_step(c)
    if not np.all(np.isfinite(arr)) or (arr.size and np.max(np.abs(arr)) >= 2.0**40 * gamma):
        raise InputError("the aggregate is not finite or too large for the noise grid; clip the updates")
    noise = _discrete_gaussian(arr.size, z * c / gamma, rng)  # int64, |noise| << 2^53
    return (np.round(arr / gamma) + noise.reshape(arr.shape)) * gamma


def round_event(
    *, noise_multiplier: float, client_sample_rate: float, clip_norm: float, dim: int | None = None,
) -> SampledGaussianEvent:
    """The ledger event of one DP-FedAvg round (with ``dim``: the noise multiplier
    :func:`add_gaussian_noise` really gives for a ``dim``-coordinate sum)."""
    if dim is not None:
        noise_multiplier = effective_noise_multiplier(noise_multiplier=noise_multiplier,
                                                      clip_norm=clip_norm, dim=dim)
    return dpfedavg_event(noise_multiplier=noise_multiplier, client_sample_rate=client_sample_rate,
                          rounds=1, clipping_norm=clip_norm)
