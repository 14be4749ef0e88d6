"""Distributed discrete Gaussian: the budget is enforced with the bound proven for it (RDP,
Kairouz, Liu & Steinke 2021, Prop. 14), never with PRV/PLD treating the sum as Gaussian."""

from __future__ import annotations

import math

import pytest

import privacy
from privacy import distributed as dd
from privacy.events import DDG_RDP_ORDERS, DistributedDiscreteGaussianEvent, SampledGaussianEvent
from privacy.ledger import Ledger, Spend
from secagg.errors import ConfigError, PrivacyBudgetExceeded, UnsupportedEventError


def event(rounds=1, summands=4, variance=0.3, d2=3.0, dim=64):
    return DistributedDiscreteGaussianEvent(d2, variance, summands, dim, rounds, 1.0)


def test_prv_and_pld_refuse_the_distributed_discrete_gaussian():
    ev = event()
    for name in ("prv", "pld"):
        with pytest.raises(UnsupportedEventError, match="rdp"):
            privacy.epsilon_of_events([ev], delta=1e-5, accountant=name)
    assert privacy.epsilon_of_events([ev], delta=1e-5, accountant="rdp") > 0


def test_the_tau_term_is_added_per_order():
    """Before: tau sat under the square root of a zCDP bound, smaller than the paper's tau*d."""
    ev = event()
    scale = 3.0 / math.sqrt(4 * 0.3)
    tau = 10 * sum(math.exp(-2 * math.pi**2 * 0.3 * k / (k + 1)) for k in range(1, 4))
    assert ev.tau == pytest.approx(tau)
    for a, r in zip(DDG_RDP_ORDERS, ev.rdp()):
        assert r == pytest.approx(min(a * scale**2 / 2 + tau * 64, a / 2 * (scale + 8 * tau) ** 2))
    # the Gaussian multiplier the old code derived from its zCDP bound understates the RDP at
    # small orders: its curve a/(2 z^2) lies below the proven bound there
    old_eps = min(math.sqrt(scale**2 + 0.5 * tau * 64), scale * 8 + tau * 8)  # D1 <= sqrt(d) D2
    a = DDG_RDP_ORDERS[0]
    assert a * old_eps**2 / 2 < ev.rdp()[0]


def test_a_budget_between_the_gaussian_prv_figure_and_the_proven_bound_is_refused(tmp_path):
    """Before: a round whose PRV figure fit the budget was accepted though its proven bound did not."""
    ev = event(rounds=1, summands=6, variance=0.6, d2=2.0, dim=256)
    proven = privacy.epsilon_of_events([ev], delta=1e-5, accountant="rdp")
    as_gaussian = privacy.epsilon_of_events(
        [SampledGaussianEvent(math.sqrt(6 * 0.6) / 2.0, 1.0, 1)], delta=1e-5, accountant="prv")
    assert as_gaussian < proven
    budget = (as_gaussian + proven) / 2
    with Ledger(tmp_path / "rdp.db", budget_epsilon=budget, delta=1e-5, accountant="rdp") as led:
        with pytest.raises(PrivacyBudgetExceeded):
            led.reserve(Spend(ev, round=1))
        assert led.rows() == []
    with Ledger(tmp_path / "prv.db", budget_epsilon=budget, delta=1e-5, accountant="prv") as led:
        with pytest.raises(UnsupportedEventError):
            led.reserve(Spend(ev, round=1))
        assert led.rows() == []


def test_ddg_events_round_trip_through_the_ledger_and_recompute(tmp_path):
    ev = event(rounds=1, summands=10, variance=50.0, d2=20.0, dim=100)
    gauss = SampledGaussianEvent(1.0, 0.01, 100)
    with Ledger(tmp_path / "l.db", budget_epsilon=50.0, delta=1e-5, accountant="rdp") as led:
        led.reserve(Spend(ev, round=1))
        led.reserve(Spend(gauss, round=2))
        led.verify(recompute=True)
        rows = led.rows()
        assert rows[0].event == ev and rows[0].mechanism == "distributed-dgauss"
        assert rows[1].epsilon["rdp"] > rows[0].epsilon["rdp"]
        assert rows[0].epsilon["prv"] is None  # PRV has no proof: not stated


def test_noise_plan_allows_for_colluders():
    from federation.accounting import DistributedNoisePlan

    plan = DistributedNoisePlan(clip=1.0, clients=10, threshold=7, bits=32, noise_multiplier=1.0, dim=50)
    assert plan.colluders == 3  # floor(9 / 3), as ClientPolicy
    assert plan.share.min_survivors == 4 and plan.event.summands == 4
    none = DistributedNoisePlan(clip=1.0, clients=10, threshold=7, bits=32, noise_multiplier=1.0, dim=50,
                                colluders=0)
    # 7/4 times the per-client noise (in model units: the fixed-point scales differ)
    assert plan.share.variance / plan.scale**2 > 1.7 * none.share.variance / none.scale**2
    with pytest.raises(ConfigError, match="colluders"):
        DistributedNoisePlan(clip=1.0, clients=10, threshold=3, bits=32, noise_multiplier=1.0, dim=50,
                             colluders=3)
    assert dd.ddgauss_noise_multiplier(client_noise=plan.share, l2_sensitivity=plan.event.l2_sensitivity,
                                       dim=50) == pytest.approx(plan.event.noise_multiplier)
