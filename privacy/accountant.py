"""Privacy accountants: RDP, PLD and PRV over :mod:`privacy.events`.

The math is done by the libraries, not re-derived here:

* ``rdp`` -- Renyi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov, Talwar &
  Zhang 2019), via Google's ``dp_accounting.rdp.RdpAccountant``. Loose but simple.
* ``pld`` -- privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022),
  via ``dp_accounting.pld.PLDAccountant``. Tight up to the discretisation (pessimistic).
* ``prv`` -- privacy loss random variables (Gopi, Lee & Wutschitz 2021), via
  ``opacus.accountants.PRVAccountant``; we report its *upper* bound. Tight.

Shape (after ``dp_accounting``): an :class:`Accountant` composes frozen events and
answers ``get_epsilon(delta)``. ``compose`` validates everything before it changes state
(check, then commit), so a refused event leaves the accountant as it was.

Record- and user-level accounting use the same math: the unit of privacy only changes what
``sample_rate`` means (records per batch vs clients per round). See ``docs/accounting.md``.

The distributed discrete Gaussian (:class:`~privacy.events.DistributedDiscreteGaussianEvent`)
is accounted by RDP only, with the per-order bound of Kairouz, Liu & Steinke 2021 (Prop. 14),
composed with any sampled-Gaussian events on the same orders; PRV and PLD have no proof for
a sum of discrete Gaussians and refuse it (:class:`UnsupportedEventError`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from privacy._checks import check_delta, check_noise_multiplier, check_sample_rate, check_steps
from privacy.events import (
    DDG_RDP_ORDERS,
    DistributedDiscreteGaussianEvent,
    PrivacyEvent,
    SampledGaussianEvent,
)
from secagg.errors import ConfigError, PrivacyError, UnsupportedEventError

if TYPE_CHECKING:  # numpy is imported where it is used, as the libraries are
    import numpy as np

AccountantName = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "pld", "rdp")

# PLD discretisation of the privacy loss; 1e-4 reproduces the PRV figure to 3 digits
# (sigma=1.12, q=256/60000, 14062 steps: 2.3102 vs 2.3101 in ~0.3 s).
PLD_DISCRETIZATION = 1e-4
# PRV: acceptable error of the epsilon estimate; we return the upper bound.
PRV_EPS_ERROR = 0.01


def _group(events: Iterable[SampledGaussianEvent]) -> list[tuple[float, float, int]]:
    """Fold consecutive events with equal (sigma, q) into one (sigma, q, steps) run."""
    runs: list[tuple[float, float, int]] = []
    for ev in events:
        if ev.steps == 0:
            continue
        if runs and runs[-1][0] == ev.noise_multiplier and runs[-1][1] == ev.sample_rate:
            runs[-1] = (ev.noise_multiplier, ev.sample_rate, runs[-1][2] + ev.steps)
        else:
            runs.append((ev.noise_multiplier, ev.sample_rate, ev.steps))
    return runs


# The costly part of every accountant is per (sigma, q) and independent of the step count: the
# RDP curve of one step, the discretised PLD of one step. A ledger recomputes the cumulative
# epsilon of a growing run of the same event every round, so these pieces are cached and the
# composition is done with the libraries' own calls, in the order their accountants use: the
# epsilon is bit-for-bit the accountants' (tests/test_privacy_accountant.py checks it).
_CACHE_SIZE = 64


def _read_only(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """For large q, a few fractional orders do not converge; dp_accounting then drops those
    orders (the bound stays valid, from the remaining orders) and logs a warning per order."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


@lru_cache(maxsize=_CACHE_SIZE)
def _rdp_of_one_step(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    """dp_accounting's RDP curve of one Poisson-sampled Gaussian step at ``orders``."""
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian

    with _quiet_absl():
        rdp = _compute_rdp_poisson_subsampled_gaussian(q=q, noise_multiplier=sigma, orders=np.array(orders))
    return _read_only(np.array(rdp, dtype=np.float64))


def _epsilon_rdp(runs: Sequence[tuple[float, float, int]], delta: float) -> float:
    """As ``dp_accounting.rdp.RdpAccountant``: ``rdp += steps * rdp_of_one_step`` per run."""
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

    orders = tuple(DEFAULT_RDP_ORDERS)
    rdp = np.zeros(len(orders), dtype=np.float64)
    for sigma, q, steps in runs:
        rdp += steps * _rdp_of_one_step(sigma, q, orders)
    with _quiet_absl():
        eps, _ = compute_epsilon(np.array(orders), rdp, delta)
    return float(eps)


@lru_cache(maxsize=_CACHE_SIZE)
def _pld_of_one_step(sigma: float, q: float):
    """dp_accounting's discretised PLD of one Poisson-sampled Gaussian step (immutable)."""
    from dp_accounting.pld.privacy_loss_distribution import from_gaussian_mechanism

    return from_gaussian_mechanism(standard_deviation=sigma, sampling_prob=q,
                                   value_discretization_interval=PLD_DISCRETIZATION)


def _epsilon_pld(runs: Sequence[tuple[float, float, int]], delta: float) -> float:
    """As ``dp_accounting.pld.PLDAccountant`` composing ``SelfComposedDpEvent`` runs in order."""
    from dp_accounting.pld.privacy_loss_distribution import from_gaussian_mechanism, identity

    pld = identity(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, steps in runs:
        if q < 1.0:
            part = _pld_of_one_step(sigma, q).self_compose(steps)
        else:  # an unsampled Gaussian: the accountant folds the steps into the noise
            part = from_gaussian_mechanism(standard_deviation=sigma / math.sqrt(steps),
                                           value_discretization_interval=PLD_DISCRETIZATION)
        pld = pld.compose(part)
    return float(pld.get_epsilon_for_delta(delta))


@lru_cache(maxsize=_CACHE_SIZE)
def _opacus_rdp_of_one_step(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP curve of one step at its default orders (sizes the PRV domain)."""
    from opacus.accountants.analysis import rdp as privacy_analysis
    from opacus.accountants.rdp import RDPAccountant

    return _read_only(privacy_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def _prv_accountant():
    """Opacus' PRVAccountant whose domain sizing reuses the cached RDP curve of each event.

    ``_get_domain`` is Opacus' ``compute_safe_domain_size`` (Gopi et al., remark 5.6) with
    ``RDPAccountant.get_epsilon`` written out: ``compute_rdp(steps=s)`` is the one-step curve
    times ``s``, summed over the runs as Opacus sums them, so the domain is the same.
    """
    import numpy as np
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis
    from opacus.accountants.analysis.prv import Domain
    from opacus.accountants.rdp import RDPAccountant

    def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
        rdp = sum([_opacus_rdp_of_one_step(sigma, q) * steps for sigma, q, steps in history])
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)

    class CachedDomainPRVAccountant(PRVAccountant):
        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            total = sum(num_self_compositions)
            history = [(prv.noise_multiplier, prv.sample_rate, n) for prv, n in zip(prvs, num_self_compositions)]
            l_max = rdp_epsilon(history, delta_error / 4)
            for sigma, q, _ in history:
                l_max = max(l_max, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
            half_width = max(l_max, eps_error) + 3
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-half_width, half_width, mesh_size)

    return CachedDomainPRVAccountant()


def _epsilon_prv(runs: Sequence[tuple[float, float, int]], delta: float) -> float:
    acc = _prv_accountant()
    acc.history = [(sigma, q, steps) for sigma, q, steps in runs]
    import numpy as np

    try:
        # log(1 - q) at q = 1; Opacus' internal RDP bound (used to size the PRV domain)
        # warns when its best order is the largest one: harmless for the PRV result.
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as exc:
        # The PRV discretisation fails for very weak noise (epsilon in the hundreds).
        raise PrivacyError(
            f"the PRV accountant could not bound epsilon for {runs} at delta={delta} ({exc}); "
            "the noise is probably far too small for a meaningful guarantee: use accountant='rdp' "
            "or 'pld', or raise the noise multiplier"
        ) from exc


_BACKENDS = {"rdp": _epsilon_rdp, "pld": _epsilon_pld, "prv": _epsilon_prv}


def check_accountant(name: str) -> str:
    if name not in _BACKENDS:
        raise ConfigError(f"accountant must be one of {list(ACCOUNTANTS)}, got {name!r}")
    return name


def _epsilon_rdp_with_ddg(runs: Sequence[tuple[float, float, int]],
                          ddg: Sequence[DistributedDiscreteGaussianEvent], delta: float) -> float:
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import (
        _compute_rdp_poisson_subsampled_gaussian,
        compute_epsilon,
    )

    orders = list(DDG_RDP_ORDERS)
    total = np.zeros(len(orders))
    for ev in ddg:
        total += np.asarray(ev.rdp(DDG_RDP_ORDERS))
    for sigma, q, steps in runs:
        if sigma == 0:
            return math.inf
        total += steps * np.asarray(_compute_rdp_poisson_subsampled_gaussian(q, sigma, orders))
    eps, _ = compute_epsilon(orders, total, delta)
    return float(eps)


def epsilon_of_events(
    events: Iterable[PrivacyEvent], *, delta: float, accountant: AccountantName = "prv"
) -> float:
    """Epsilon of the composition of ``events`` at ``delta`` (pure function)."""
    check_accountant(accountant)
    delta = check_delta(delta)
    events = list(events)
    for ev in events:
        if not isinstance(ev, (SampledGaussianEvent, DistributedDiscreteGaussianEvent)):
            raise UnsupportedEventError(
                f"cannot account {type(ev).__name__}; expected a SampledGaussianEvent or a "
                "DistributedDiscreteGaussianEvent"
            )
    ddg = [ev for ev in events if isinstance(ev, DistributedDiscreteGaussianEvent) and ev.steps]
    if ddg:
        if accountant != "rdp":
            raise UnsupportedEventError(
                f"the {accountant} accountant has no proof for the distributed discrete Gaussian "
                "(it would treat the sum of discrete Gaussians as a continuous Gaussian); account it "
                "with accountant='rdp'"
            )
        runs = _group(ev for ev in events if isinstance(ev, SampledGaussianEvent))
        return _epsilon_rdp_with_ddg(runs, ddg, delta)
    runs = _group(events)
    if not runs:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in runs):
        return math.inf  # a release without noise has no DP guarantee
    return _BACKENDS[accountant](runs, delta)


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "prv",
    dataset_size: int | None = None,
) -> float:
    """Epsilon after ``steps`` Poisson-sampled Gaussian steps.

    >>> round(epsilon(noise_multiplier=1.12, sample_rate=256/60000, steps=14062,
    ...               delta=1e-5, accountant="rdp"), 2)
    2.52

    ``dataset_size`` (optional) enables the ``delta < 1/n`` check.
    """
    event = SampledGaussianEvent(
        check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate), check_steps(steps)
    )
    delta = check_delta(delta, dataset_size=dataset_size)
    return epsilon_of_events([event], delta=delta, accountant=accountant)


class Accountant:
    """Composes :class:`SampledGaussianEvent` values; answers epsilon for a delta.

    ``Accountant("pld").compose(e1).compose(e2).get_epsilon(1e-5)``.
    """

    def __init__(self, name: AccountantName = "prv") -> None:
        self.name = check_accountant(name)
        self._events: list[SampledGaussianEvent] = []

    @property
    def events(self) -> tuple[SampledGaussianEvent, ...]:
        return tuple(self._events)

    @property
    def steps(self) -> int:
        return sum(ev.steps for ev in self._events)

    def supports(self, event: object) -> bool:
        return isinstance(event, SampledGaussianEvent)

    def compose(self, event: SampledGaussianEvent, count: int = 1) -> Accountant:
        # check ...
        if not self.supports(event):
            raise UnsupportedEventError(
                f"the {self.name} accountant cannot account {type(event).__name__}"
            )
        count = check_steps(count, name="count")
        # ... then commit
        self._events.extend([event] * count)
        return self

    def get_epsilon(self, delta: float) -> float:
        return epsilon_of_events(self._events, delta=delta, accountant=self.name)
