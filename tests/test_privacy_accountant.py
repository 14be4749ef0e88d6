"""Accountants and planner: reference figures, closed forms, cross-checks, bad input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import privacy
from privacy import Accountant, SampledGaussianEvent, dpfedavg_event, dpsgd_event
from privacy.accountant import epsilon_of_events
from secagg.errors import ConfigError, UnsupportedEventError

REF = dict(noise_multiplier=1.12, sample_rate=256 / 60000, steps=14062, delta=1e-5)


@pytest.fixture(scope="module")
def reference_eps():
    return {name: privacy.epsilon(**REF, accountant=name) for name in ("prv", "pld", "rdp")}


def test_reference_point(reference_eps):
    # Abadi et al. / Opacus figure: ~2.31 with PLD/PRV, ~2.52 with RDP.
    assert reference_eps["pld"] == pytest.approx(2.31, abs=0.01)
    assert reference_eps["prv"] == pytest.approx(2.31, abs=0.02)
    assert reference_eps["rdp"] == pytest.approx(2.52, abs=0.01)


def test_tight_accountants_agree_and_rdp_is_looser(reference_eps):
    assert abs(reference_eps["prv"] - reference_eps["pld"]) / reference_eps["pld"] < 0.01
    assert reference_eps["rdp"] > reference_eps["prv"]
    assert reference_eps["rdp"] > reference_eps["pld"]


def test_rdp_matches_opacus_rdp_implementation():
    # Two independent RDP implementations (Google dp-accounting vs Opacus analysis.rdp).
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(REF["noise_multiplier"], REF["sample_rate"], REF["steps"])]
    ours = privacy.epsilon(**REF, accountant="rdp")
    assert ours == pytest.approx(acc.get_epsilon(REF["delta"]), rel=1e-4)


def _gaussian_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism with mu = sensitivity/std (Balle & Wang 2018)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 4), (0.8, 3)])
def test_unsampled_gaussian_against_closed_form(sigma, steps):
    # q = 1: `steps` Gaussian releases = one Gaussian with mu = sqrt(steps)/sigma.
    delta = 1e-5
    mu = math.sqrt(steps) / sigma
    # exact epsilon for this delta, by bisection on the closed form
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, mu) > delta else (lo, mid)
    exact = hi
    for name in ("pld", "prv"):
        eps = privacy.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta,
                              accountant=name)
        assert exact - 1e-6 <= eps <= exact * 1.02 + 0.01, name  # upper bound, nearly tight
    # RDP of the Gaussian is alpha * steps / (2 sigma^2); the classic conversion is an upper
    # bound on what the accountant returns (it uses an improved conversion).
    rho = steps / (2 * sigma**2)
    classic = min(a * rho + math.log(1 / delta) / (a - 1) for a in [1 + i / 100 for i in range(1, 20000)])
    rdp = privacy.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta,
                          accountant="rdp")
    assert exact <= rdp <= classic + 1e-9


def test_composition_identities():
    ev1 = dpsgd_event(noise_multiplier=1.0, sample_rate=0.02, steps=1)
    ev30 = dpsgd_event(noise_multiplier=1.0, sample_rate=0.02, steps=30)
    for name in ("rdp", "pld"):
        a = Accountant(name).compose(ev1, count=30).get_epsilon(1e-5)
        b = Accountant(name).compose(ev30).get_epsilon(1e-5)
        c = privacy.epsilon(noise_multiplier=1.0, sample_rate=0.02, steps=30, delta=1e-5,
                            accountant=name)
        assert a == pytest.approx(b, rel=1e-9) and b == pytest.approx(c, rel=1e-9)


def test_heterogeneous_composition_is_between_parts():
    weak = dpfedavg_event(noise_multiplier=0.8, client_sample_rate=0.1, rounds=5)
    strong = dpfedavg_event(noise_multiplier=2.0, client_sample_rate=0.1, rounds=5)
    both = epsilon_of_events([weak, strong], delta=1e-5, accountant="rdp")
    assert epsilon_of_events([weak], delta=1e-5, accountant="rdp") < both
    assert both < epsilon_of_events([weak, weak], delta=1e-5, accountant="rdp")


def test_user_and_record_level_share_the_math():
    rec = dpsgd_event(noise_multiplier=1.3, sample_rate=0.05, steps=20)
    usr = dpfedavg_event(noise_multiplier=1.3, client_sample_rate=0.05, rounds=20)
    assert rec.level.value == "record" and usr.level.value == "user"
    assert epsilon_of_events([rec], delta=1e-6, accountant="rdp") == epsilon_of_events(
        [usr], delta=1e-6, accountant="rdp")


def test_no_noise_means_infinite_epsilon_and_no_steps_means_zero():
    assert privacy.epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=3, delta=1e-5) == math.inf
    assert privacy.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0


@settings(max_examples=8, deadline=None)
@given(sigma=st.floats(0.6, 5.0), q=st.floats(0.001, 1.0), steps=st.integers(1, 200))
def test_epsilon_monotone(sigma, q, steps):
    e = lambda **kw: privacy.epsilon(**{**dict(noise_multiplier=sigma, sample_rate=q, steps=steps,
                                                delta=1e-5, accountant="rdp"), **kw})
    base = e()
    assert e(noise_multiplier=sigma * 1.2) <= base + 1e-12
    assert e(steps=steps + 10) >= base - 1e-12
    assert e(delta=1e-7) >= base - 1e-12


def test_accountant_check_then_commit():
    acc = Accountant("rdp").compose(dpsgd_event(noise_multiplier=1.0, sample_rate=0.1, steps=3))
    before = acc.events
    with pytest.raises(UnsupportedEventError):
        acc.compose("laplace")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        acc.compose(before[0], count=-1)
    assert acc.events == before
    assert acc.supports(before[0]) and not acc.supports(object())


def test_event_roundtrip():
    ev = dpfedavg_event(noise_multiplier=1.1, client_sample_rate=0.3, rounds=7, clipping_norm=0.5)
    assert SampledGaussianEvent.from_dict(ev.to_dict()) == ev


# ---------------------------------------------------------------- planner
@pytest.mark.parametrize("accountant", ["rdp"])
def test_planner_roundtrip(accountant):
    q, steps, delta = 0.01, 300, 1e-5
    target = privacy.epsilon(noise_multiplier=1.3, sample_rate=q, steps=steps, delta=delta,
                             accountant=accountant)
    sigma = privacy.noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q,
                                     steps=steps, accountant=accountant)
    assert sigma == pytest.approx(1.3, rel=5e-3)
    assert privacy.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta,
                           accountant=accountant) <= target + 1e-9


def test_planner_prv_reference():
    sigma = privacy.noise_multiplier(target_epsilon=2.31, delta=1e-5, sample_rate=256 / 60000,
                                     steps=14062, accountant="prv")
    assert sigma == pytest.approx(1.12, abs=0.02)


def test_max_steps_roundtrip():
    n = privacy.max_steps(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, noise_multiplier=1.0,
                          accountant="rdp")
    eps = lambda s: privacy.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=s, delta=1e-5,
                                    accountant="rdp")
    assert eps(n) <= 2.0 < eps(n + 1)


def test_planner_impossible_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="raise the target epsilon"):
        privacy.noise_multiplier(target_epsilon=1e-6, delta=1e-9, sample_rate=1.0, steps=10**6,
                                 accountant="rdp")


def test_plan_budget_states_sampling_either_way_and_answers_either_question():
    """What `secagg plan` prints, from the library: rate and steps from batch/dataset/epochs."""
    from privacy.planner import plan_budget

    out = plan_budget(delta=1e-5, noise_multiplier=1.1, batch_size=256, dataset_size=60000, epochs=2,
                      accountants=("rdp",))
    q = 256 / 60000
    assert (out["sample_rate"], out["steps"]) == (q, math.ceil(2 / q))
    assert out["epsilon"]["rdp"] == privacy.epsilon(noise_multiplier=1.1, sample_rate=q, steps=out["steps"],
                                                    delta=1e-5, accountant="rdp", dataset_size=60000)
    back = plan_budget(delta=1e-5, target_epsilon=out["epsilon"]["rdp"], sample_rate=q, steps=out["steps"],
                       accountants=("rdp",))
    assert back["noise_multiplier"]["rdp"] == pytest.approx(1.1, rel=1e-2)
    for bad, match in [({"sample_rate": q, "batch_size": 256, "steps": 1}, "not both"),
                       ({"steps": 1}, "missing sampling rate"), ({"sample_rate": q}, "missing length"),
                       ({"sample_rate": q, "steps": 1, "epochs": 1}, "not both")]:
        with pytest.raises(ConfigError, match=match):
            plan_budget(delta=1e-5, noise_multiplier=1.0, **bad)
    with pytest.raises(ConfigError, match="not both"):
        plan_budget(delta=1e-5, noise_multiplier=1.0, target_epsilon=1.0, sample_rate=q, steps=1)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sample_rate=0.0), r"sample_rate must lie in \(0, 1\]"),
        (dict(sample_rate=1.5), r"sample_rate must lie in \(0, 1\]"),
        (dict(sample_rate=float("nan")), "sample_rate"),
        (dict(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
        (dict(steps=-3), "steps must be >= 0"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(delta=1.0), r"delta must lie in \(0, 1\)"),
        (dict(delta=0.0), r"delta must lie in \(0, 1\)"),
        (dict(delta=1e-3, dataset_size=5000), "choose delta < 0.0002"),
        (dict(accountant="moments"), "accountant must be one of"),
    ],
)
def test_bad_input_typed_errors(kwargs, match):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        privacy.epsilon(**args)


def test_planner_bad_input():
    with pytest.raises(ConfigError, match="target_epsilon"):
        privacy.noise_multiplier(target_epsilon=-1, delta=1e-5, sample_rate=0.1, steps=10)
    with pytest.raises(ConfigError, match="1/n"):
        privacy.noise_multiplier(target_epsilon=1, delta=0.01, sample_rate=0.1, steps=10,
                                 dataset_size=1000)


# Mixed sequences: repeated rounds, a change of noise or rate, an unsampled (q = 1) release,
# and a return to an earlier event (not folded with its first run: only neighbours are).
_MIXED_SEQUENCES = [
    [SampledGaussianEvent(3.0, 0.5, 4)] * 6,
    [SampledGaussianEvent(1.1, 0.01, 50)] * 3 + [SampledGaussianEvent(2.0, 0.05, 10)] * 2
    + [SampledGaussianEvent(1.1, 0.01, 50)],
    [SampledGaussianEvent(4.0, 1.0, 1)] * 4 + [SampledGaussianEvent(1.5, 0.2, 3)] * 3,
]


def _library_epsilon(runs, *, delta, accountant):
    """The libraries' own accountants, fed one ``(sigma, q, steps)`` entry per item of ``runs``."""
    import dp_accounting
    import numpy as np
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants import PRVAccountant

    from privacy.accountant import PLD_DISCRETIZATION, PRV_EPS_ERROR

    if accountant == "prv":
        acc = PRVAccountant()
        acc.history = list(runs)
        with np.errstate(divide="ignore", invalid="ignore"):  # log(1 - q) at q = 1, as in privacy.accountant
            return acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR)
    parts = []
    for sigma, q, steps in runs:
        inner = dp_accounting.GaussianDpEvent(sigma)
        if q < 1.0:
            inner = dp_accounting.PoissonSampledDpEvent(q, inner)
        parts.append(dp_accounting.SelfComposedDpEvent(inner, steps))
    acc = RdpAccountant() if accountant == "rdp" else PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dp_accounting.ComposedDpEvent(parts))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["prv", "pld", "rdp"])
def test_cached_accounting_is_the_libraries_accountant_exactly(accountant):
    # The per-(sigma, q) pieces are cached; the composition must still be the library
    # accountant's, bit for bit, on every prefix (a ledger asks for each prefix in turn), so a
    # ledger written before the cache still verifies with recompute=True (tolerance 1e-6).
    from privacy.accountant import _group

    for events in _MIXED_SEQUENCES:
        for end in sorted({1, len(events) - 1, len(events)}):  # first round, a later one, the last
            prefix = events[:end]
            ours = epsilon_of_events(prefix, delta=1e-5, accountant=accountant)
            assert ours == _library_epsilon(_group(prefix), delta=1e-5, accountant=accountant)


@pytest.mark.parametrize("accountant", ["prv", "pld", "rdp"])
def test_grouped_runs_match_event_by_event_composition(accountant):
    # Consecutive equal events are composed as one SelfComposedDpEvent run. Against composing
    # every step separately: RDP adds the same curves (equal up to float rounding); PLD
    # self-composes by FFT instead of step-by-step convolutions, both pessimistic at the same
    # discretisation (measured gap below 1e-3 here); PRV's upper bound is within eps_error of
    # the true epsilon either way, so the two upper bounds are within PRV_EPS_ERROR.
    from privacy.accountant import PRV_EPS_ERROR

    tolerance = {"rdp": 1e-9, "pld": 1e-3, "prv": PRV_EPS_ERROR}[accountant]
    one_step = [SampledGaussianEvent(3.0, 0.5, 1)] * 4 + [SampledGaussianEvent(4.0, 1.0, 1)] * 2
    for events in (one_step + [SampledGaussianEvent(1.5, 0.2, 1)] * 3, one_step + one_step[:2]):
        grouped = epsilon_of_events(events, delta=1e-5, accountant=accountant)
        steps = [(ev.noise_multiplier, ev.sample_rate, 1) for ev in events for _ in range(ev.steps)]
        separate = _library_epsilon(steps, delta=1e-5, accountant=accountant)
        assert abs(grouped - separate) <= tolerance * max(1.0, separate)
