"""Property: no server strategy with at most the assumed colluders gets both share kinds of one client.

For random n, collusion bound (the clients' own policy) and splits of the honest clients,
a lying server runs the split attack against the real client sessions (group A told the
victim survived, group B that it dropped, the rest never asked), with colluders that sign
both views and hand over the shares they hold. It must never collect t self-mask shares
and t mask-key shares of the victim. The plan is the planner's; every client re-checks it.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg.protocol.plan import ClientPolicy, plan_masking
from tests.protocol_harness import make_round, split_attack


@st.composite
def scenarios(draw):
    n = draw(st.integers(4, 9))
    collusion = draw(st.sampled_from([0.0, 0.2, 1 / 3, 0.45]))
    policy = ClientPolicy(collusion=collusion)
    victim = draw(st.integers(1, n))
    others = [c for c in range(1, n + 1) if c != victim]
    n_colluders = draw(st.integers(0, policy.colluders(n)))
    colluders = set(draw(st.permutations(others))[:n_colluders])
    roles = draw(st.lists(st.sampled_from("AB-"), min_size=len(others), max_size=len(others)))
    honest = [c for c in others if c not in colluders]
    group_a = {c for c, r in zip(honest, roles) if r == "A"}
    group_b = {c for c, r in zip(honest, roles) if r == "B"}
    return n, policy, victim, colluders, group_a, group_b


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_no_split_with_at_most_the_assumed_colluders_reveals_both_share_kinds(scenario):
    n, policy, victim, colluders, group_a, group_b = scenario
    t = plan_masking(n, policy=policy).threshold
    session, _ = make_round(n=n, policy=policy)
    assert session.config.threshold == t
    seeds, keys, _ = split_attack(session, victim, colluders, group_a, group_b)
    assert len(seeds) < t or len(keys) < t
