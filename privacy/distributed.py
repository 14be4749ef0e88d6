"""Distributed discrete noise for masked (secure) aggregation.

Each client adds its *share* of the noise in the integer (quantized) domain, before
masking, so the noise survives quantization and modular arithmetic, and the server only
ever sees the noisy sum. Two families:

* ``"dgauss"`` -- discrete Gaussian N_Z(0, s^2) per client (Canonne, Kamath & Steinke
  2020; distributed use: Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian
  Mechanism for Federated Learning with Secure Aggregation"). Sampled here from the
  operating system CSPRNG (``os.urandom``). The default.
* ``"skellam"`` -- symmetric Skellam, Poisson(mu/2) - Poisson(mu/2) per coordinate
  (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially Private
  Federated Learning"). Sums of independent Skellams are exactly Skellam.

Calibration to dropouts and colluders: with ``n`` clients of which at most ``max_dropouts``
may drop out, at least ``n - max_dropouts`` noise shares reach the sum; colluding clients
know their own shares and can subtract them, so only ``m = n - max_dropouts - colluders``
shares are noise to the adversary. Each client adds variance ``target_std**2 / m``, so the
honest shares alone carry at least the target variance whenever the round completes (more
survivors -> more noise, never less). A dropped client's noise share is simply absent: it is
never reconstructed. :class:`~federation.accounting.DistributedNoisePlan` assumes, as the
masking policy does (:class:`secagg.protocol.plan.ClientPolicy`), that a third of the other
participants collude.

Accounting (see ``docs/accounting.md``):

* dgauss: a :class:`~privacy.events.DistributedDiscreteGaussianEvent`, accounted by RDP
  with Kairouz, Liu & Steinke 2021, Prop. 14 / Eq. 17: for every order a >= 1 one release of
  the sum of m discrete Gaussians of parameter s with integer L2 sensitivity D2 in dimension d
  has ``rdp(a) <= min(a S^2/2 + tau d, a/2 (S + sqrt(d) tau)^2)``, ``S = D2 / sqrt(m s^2)``,
  ``tau = 10 * sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k/(k+1))``. The tau term is added per order,
  not under the square root of a zCDP bound. PRV and PLD refuse the event: they would treat
  the sum as a continuous Gaussian, for which no proof covers this mechanism.
* skellam: Agarwal et al. 2021 (Cor. 3.6): for integer order a > 1 and total per-coordinate
  variance V, ``rdp(a) <= a D2^2/(2V) + min(((2a-1) D2^2 + 6 D1)/(4 V^2), 3 D1/(2V))``.
  :func:`skellam_epsilon` uses that bound directly; :func:`skellam_noise_multiplier` gives
  the largest Gaussian ``z`` whose RDP dominates it on integer orders 2..256 (for ledgers).

Sensitivity in integer units: a client update clipped to L2 norm ``c`` and scaled by
``scale`` before randomized rounding has integer L2 sensitivity at most
``c*scale + sqrt(d)`` (each coordinate moves by < 1); with Kairouz et al.'s conditional
randomized rounding (retry until the rounded norm is below the bound, failure
probability ``beta``), at most
``sqrt(min((c*scale)^2 + d/4 + sqrt(2 ln(1/beta)) (c*scale + sqrt(d)/2), (c*scale + sqrt(d))^2))``.
Modular wrap-around of the sum must be ruled out by the encoding (enough bits).
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from privacy._checks import (
    check_delta,
    check_positive,
    check_positive_int,
    check_sample_rate,
    check_steps,
)
from privacy.events import DistributedDiscreteGaussianEvent, Level, Mechanism, SampledGaussianEvent
from secagg.errors import ConfigError


class NoiseKind(str, enum.Enum):
    DGAUSS = "dgauss"
    SKELLAM = "skellam"


@dataclass(frozen=True, slots=True)
class ClientNoise:
    """One client's noise share: family and per-coordinate variance (integer units).

    For ``dgauss`` the sampler's parameter is ``s = sqrt(variance)`` (the variance of
    N_Z(0, s^2) is at most s^2, and equal to it up to ~1e-8 relative for s >= 1).
    For ``skellam`` it is Poisson(variance/2) - Poisson(variance/2) (variance exact).
    """

    kind: NoiseKind
    variance: float
    min_survivors: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", NoiseKind(self.kind))
        except ValueError:
            raise ConfigError(f"noise kind must be 'dgauss' or 'skellam', got {self.kind!r}") from None
        object.__setattr__(self, "variance", check_positive(self.variance, name="variance"))
        check_positive_int(self.min_survivors, name="min_survivors")

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    @property
    def aggregate_std(self) -> float:
        """Noise std of the sum when exactly ``min_survivors`` shares arrive (the minimum)."""
        return math.sqrt(self.variance * self.min_survivors)


def per_client_noise(
    *, target_std: float, n_clients: int, max_dropouts: int, kind: str = "dgauss"
) -> ClientNoise:
    """Each client's noise so the sum over >= ``n_clients - max_dropouts`` survivors has
    std >= ``target_std`` (integer units)."""
    target_std = check_positive(target_std, name="target_std")
    n = check_positive_int(n_clients, name="n_clients")
    if isinstance(max_dropouts, bool) or not isinstance(max_dropouts, int) or max_dropouts < 0:
        raise ConfigError(f"max_dropouts must be an integer >= 0, got {max_dropouts!r}")
    if max_dropouts >= n:
        raise ConfigError(
            f"max_dropouts={max_dropouts} leaves no surviving client out of n_clients={n}; "
            "it must be < n_clients (and the secure-aggregation threshold needs more survivors)"
        )
    m = n - max_dropouts
    return ClientNoise(kind=kind, variance=target_std**2 / m, min_survivors=m)


# ---------------------------------------------------------------------------------
# sensitivity after quantization
# ---------------------------------------------------------------------------------
def quantized_l2_sensitivity(
    *, clip_norm: float, scale: float, dim: int, beta: float | None = None
) -> float:
    """Integer-domain L2 sensitivity of one client's clipped, scaled, rounded update.

    ``beta=None``: any unbiased randomized rounding (each coordinate moves by < 1), bound
    ``c*scale + sqrt(d)``. ``beta`` in (0, 1): conditional randomized rounding of Kairouz et
    al. 2021 (Eq. for the rounded norm bound), which the encoder must then implement.
    """
    c = check_positive(clip_norm, name="clip_norm") * check_positive(scale, name="scale")
    d = check_positive_int(dim, name="dim")
    worst = (c + math.sqrt(d)) ** 2
    if beta is None:
        return math.sqrt(worst)
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"beta must lie in (0, 1), got {beta!r}")
    cond = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return math.sqrt(min(cond, worst))


def quantized_l1_sensitivity(*, l2_sensitivity: float, dim: int) -> float:
    """L1 sensitivity implied by an integer L2 bound: ``min(sqrt(d) D2, D2^2)``."""
    d2 = check_positive(l2_sensitivity, name="l2_sensitivity")
    return min(math.sqrt(check_positive_int(dim, name="dim")) * d2, d2 * d2)


# ---------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------
def ddgauss_tau(*, client_variance: float, survivors: int) -> float:
    """Kairouz et al. 2021: tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k/(k+1))."""
    s2 = check_positive(client_variance, name="client_variance")
    m = check_positive_int(survivors, name="survivors")
    return 10.0 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, m))


def ddgauss_event(
    *, client_noise: ClientNoise, l2_sensitivity: float, dim: int, rounds: int = 1,
    survivors: int | None = None, clipping_norm: float | None = None,
) -> DistributedDiscreteGaussianEvent:
    """The RDP-accounted event of ``rounds`` distributed discrete Gaussian releases.

    ``survivors`` (shares unknown to the adversary) defaults to the calibrated minimum.
    """
    if client_noise.kind is not NoiseKind.DGAUSS:
        raise ConfigError("ddgauss_event needs dgauss client noise")
    m = check_positive_int(survivors if survivors is not None else client_noise.min_survivors,
                           name="survivors")
    return DistributedDiscreteGaussianEvent(
        check_positive(l2_sensitivity, name="l2_sensitivity"), client_noise.variance, m,
        check_positive_int(dim, name="dim"), check_steps(rounds, name="rounds"), clipping_norm)


def ddgauss_noise_multiplier(
    *, client_noise: ClientNoise, l2_sensitivity: float, dim: int,
    l1_sensitivity: float | None = None, survivors: int | None = None,
) -> float:
    """The largest Gaussian noise multiplier whose RDP dominates one release of the
    distributed discrete Gaussian sum (Prop. 14 bound) at every order; for display.

    ``survivors`` defaults to the calibrated minimum (the worst case). ``l1_sensitivity``
    is accepted for symmetry with Skellam and not used (the bound used needs only D2).
    """
    return ddgauss_event(client_noise=client_noise, l2_sensitivity=l2_sensitivity, dim=dim,
                         survivors=survivors).noise_multiplier


SKELLAM_ORDERS = tuple(range(2, 257))


def skellam_rdp(*, order: int, l2_sensitivity: float, l1_sensitivity: float, variance: float) -> float:
    """Agarwal et al. 2021, Cor. 3.6: RDP of the Skellam mechanism (total variance V)."""
    a, d2sq, d1, v = order, l2_sensitivity**2, l1_sensitivity, variance
    return a * d2sq / (2 * v) + min(((2 * a - 1) * d2sq + 6 * d1) / (4 * v * v), 3 * d1 / (2 * v))


def skellam_epsilon(
    *, client_noise: ClientNoise, l2_sensitivity: float, dim: int, rounds: int, delta: float,
    l1_sensitivity: float | None = None, survivors: int | None = None,
) -> float:
    """Epsilon of ``rounds`` releases of the distributed Skellam sum (no sampling claimed)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if client_noise.kind is not NoiseKind.SKELLAM:
        raise ConfigError("skellam_epsilon needs skellam client noise")
    m = check_positive_int(survivors if survivors is not None else client_noise.min_survivors,
                           name="survivors")
    rounds = check_steps(rounds, name="rounds")
    delta = check_delta(delta)
    d2 = check_positive(l2_sensitivity, name="l2_sensitivity")
    d1 = l1_sensitivity if l1_sensitivity is not None else quantized_l1_sensitivity(
        l2_sensitivity=d2, dim=dim)
    v = m * client_noise.variance
    rdp = [rounds * skellam_rdp(order=a, l2_sensitivity=d2, l1_sensitivity=d1, variance=v)
           for a in SKELLAM_ORDERS]
    eps, _ = compute_epsilon(SKELLAM_ORDERS, rdp, delta)
    return float(eps)


def skellam_noise_multiplier(
    *, client_noise: ClientNoise, l2_sensitivity: float, dim: int,
    l1_sensitivity: float | None = None, survivors: int | None = None,
) -> float:
    """Largest Gaussian multiplier z with a/(2 z^2) >= Skellam RDP(a) for a = 2..256."""
    if client_noise.kind is not NoiseKind.SKELLAM:
        raise ConfigError("skellam_noise_multiplier needs skellam client noise")
    m = check_positive_int(survivors if survivors is not None else client_noise.min_survivors,
                           name="survivors")
    d2 = check_positive(l2_sensitivity, name="l2_sensitivity")
    d1 = l1_sensitivity if l1_sensitivity is not None else quantized_l1_sensitivity(
        l2_sensitivity=d2, dim=dim)
    v = m * client_noise.variance
    return min(
        math.sqrt(a / (2 * skellam_rdp(order=a, l2_sensitivity=d2, l1_sensitivity=d1, variance=v)))
        for a in SKELLAM_ORDERS
    )


def aggregate_noise_multiplier(
    *, client_noise: ClientNoise, l2_sensitivity: float, dim: int,
    l1_sensitivity: float | None = None, survivors: int | None = None,
) -> float:
    """Gaussian-equivalent noise multiplier of the noisy sum, for the accountants."""
    fn = ddgauss_noise_multiplier if client_noise.kind is NoiseKind.DGAUSS else skellam_noise_multiplier
    return fn(client_noise=client_noise, l2_sensitivity=l2_sensitivity, dim=dim,
              l1_sensitivity=l1_sensitivity, survivors=survivors)


def distributed_event(
    *, client_noise: ClientNoise, l2_sensitivity: float, dim: int, rounds: int = 1,
    sample_rate: float = 1.0, clipping_norm: float | None = None,
    l1_sensitivity: float | None = None,
) -> SampledGaussianEvent | DistributedDiscreteGaussianEvent:
    """User-level ledger event for ``rounds`` distributed-noise releases.

    dgauss: a :class:`DistributedDiscreteGaussianEvent` (RDP-accounted, q = 1: no
    amplification by client sampling is claimed; ``sample_rate`` must be 1). Skellam: the
    Gaussian event whose RDP dominates the Skellam bound on integer orders; ``sample_rate``
    below 1 only if clients really are Poisson-sampled (see ``docs/accounting.md``).
    """
    if client_noise.kind is NoiseKind.DGAUSS:
        if check_sample_rate(sample_rate) != 1.0:
            raise ConfigError("the distributed discrete Gaussian is accounted without amplification by "
                              "sampling: sample_rate must be 1")
        return ddgauss_event(client_noise=client_noise, l2_sensitivity=l2_sensitivity, dim=dim,
                             rounds=rounds, clipping_norm=clipping_norm)
    z = aggregate_noise_multiplier(client_noise=client_noise, l2_sensitivity=l2_sensitivity,
                                   dim=dim, l1_sensitivity=l1_sensitivity)
    mech = (Mechanism.DISTRIBUTED_DGAUSS if client_noise.kind is NoiseKind.DGAUSS
            else Mechanism.DISTRIBUTED_SKELLAM)
    return SampledGaussianEvent(z, check_sample_rate(sample_rate), rounds, Level.USER, mech,
                                clipping_norm)


def target_std_for(*, noise_multiplier: float, l2_sensitivity: float) -> float:
    """Aggregate noise std (integer units) for a planned Gaussian noise multiplier.

    For dgauss the tau correction makes the effective multiplier slightly smaller; check
    with :func:`ddgauss_noise_multiplier` (negligible once per-client s >= 1).
    """
    return check_positive(noise_multiplier, name="noise_multiplier") * check_positive(
        l2_sensitivity, name="l2_sensitivity")


# ---------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------
_WARNED_SEEDED = False


def os_uniform(size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Uniform doubles in (0, 1]: 53 random bits each, from os.urandom unless ``rng`` (tests only)."""
    if rng is None:
        bits = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
    else:
        bits = rng.integers(0, 2**64, size=size, dtype=np.uint64)
    return ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * (2.0**-53)


def _discrete_laplace(size: int, t: int, rng: np.random.Generator | None) -> np.ndarray:
    # Difference of two geometric variables: P(G >= k) = exp(-k/t) for G = floor(-t ln U).
    g1 = np.floor(-t * np.log(os_uniform(size, rng)))
    g2 = np.floor(-t * np.log(os_uniform(size, rng)))
    return (g1 - g2).astype(np.int64)


def _discrete_gaussian(size: int, sigma: float, rng: np.random.Generator | None) -> np.ndarray:
    """Canonne, Kamath & Steinke 2020, Algorithm 3, vectorised, in double precision.

    Sample Y from the discrete Laplace of scale t = floor(sigma) + 1 and accept with
    probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). The output is integer-valued by
    construction (no floating-point support holes); acceptance probabilities are doubles,
    so the law matches N_Z(0, sigma^2) up to ~2^-53 relative error per probability.
    """
    t = int(math.floor(sigma)) + 1
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        need = size - filled
        batch = max(16, int(need * 1.6) + 16)  # acceptance rate is > 1/2 in practice
        y = _discrete_laplace(batch, t, rng)
        p = np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        ok = y[os_uniform(batch, rng) <= p]
        take = min(len(ok), need)
        out[filled : filled + take] = ok[:take]
        filled += take
    return out


def _skellam(size: int, variance: float, rng: np.random.Generator | None) -> np.ndarray:
    # numpy's Poisson sampler needs a numpy Generator. Without an explicit rng we seed a
    # fresh PCG64 with 256 bits from os.urandom for every call: unpredictable, but PCG64 is
    # not a CSPRNG. Prefer "dgauss" (sampled from os.urandom directly) where that matters.
    gen = rng if rng is not None else np.random.Generator(
        np.random.PCG64(int.from_bytes(os.urandom(32), "big")))
    lam = variance / 2.0
    return gen.poisson(lam, size=size).astype(np.int64) - gen.poisson(lam, size=size).astype(np.int64)


def sample_integer_noise(
    size: int | tuple[int, ...], param: ClientNoise, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw one client's integer noise share (int64 array of shape ``size``).

    Randomness comes from ``os.urandom`` unless ``rng`` is given. Passing ``rng`` makes
    the noise reproducible, hence worthless for privacy: for tests only (warns once).
    """
    global _WARNED_SEEDED
    if not isinstance(param, ClientNoise):
        raise ConfigError(f"param must be a ClientNoise (see per_client_noise), got {param!r}")
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    if any((not isinstance(s, (int, np.integer))) or s < 0 for s in shape):
        raise ConfigError(f"size must be a non-negative int or a tuple of them, got {size!r}")
    if rng is not None and not _WARNED_SEEDED:
        _WARNED_SEEDED = True
        warnings.warn("integer noise drawn from a caller-supplied generator: reproducible, "
                      "not private; use rng=None outside tests", RuntimeWarning, stacklevel=2)
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return np.zeros(shape, dtype=np.int64)
    if param.kind is NoiseKind.DGAUSS:
        flat = _discrete_gaussian(count, param.std, rng)
    else:
        flat = _skellam(count, param.variance, rng)
    return flat.reshape(shape)
