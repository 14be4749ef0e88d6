"""The one threshold rule (secagg.protocol.plan): formulas, planner choices and the documented table."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import secagg
from secagg.protocol.mode import plan_from_options
from secagg.errors import ConfigError
from secagg.protocol.plan import ClientPolicy, attack_size, check_round, min_threshold, plan_masking

DOC = Path(__file__).resolve().parent.parent / "docs" / "threat-model.md"


@pytest.mark.parametrize("collusion", [0.0, 0.2, 1 / 3, 0.45])
def test_complete_graph_threshold_is_bonawitz_t_greater_than_n_plus_c_over_two(collusion):
    policy = ClientPolicy(collusion=collusion)
    for n in range(3, 120):
        c = policy.colluders(n)
        assert c == math.floor(collusion * (n - 1) + 1e-9)
        assert min_threshold(n, n - 1, policy) == (n + c) // 2 + 1


def test_attack_size_is_the_cheaper_of_split_and_isolation():
    assert attack_size(5, 6) == min(4, 3)
    assert attack_size(3, 2) == 2  # t = k + 1: isolation (all neighbours colluding) is the cheaper attack


def test_a_sparse_threshold_keeps_the_attack_beyond_the_colluder_tail():
    policy = ClientPolicy()
    for n, k in [(100, 90), (1000, 318), (50, 20)]:
        t = min_threshold(n, k, policy)
        assert t is not None and t <= k + 1
        assert check_round(n, k, t, policy) is None
        assert "too low" in check_round(n, k, t - 1, policy)


def test_planned_degree_meets_both_documented_bounds():
    """Moved from test_graph (choose_degree is replaced by the planner): security and correctness bounds."""
    from secagg.protocol.plan import _log2_binomial_tail_above, _log2_colluder_tail

    policy = ClientPolicy()
    for n, dropout in [(100, 0.1), (1000, 0.1), (1000, 0.05), (2000, 0.2)]:
        plan = plan_masking(n, graph="sparse", dropout=dropout)
        k, t = plan.degree, plan.threshold
        assert k < n - 1  # sparse was possible for these
        tail = _log2_colluder_tail(n - 1, policy.colluders(n), k)
        m = attack_size(t, k)
        assert m >= len(tail) or tail[m] <= -(80 + math.log2(n))
        assert _log2_binomial_tail_above(k + 1, dropout, k + 1 - t) <= -(20 + math.log2(n))


def test_degree_grows_with_dropout_and_falls_back_to_complete():
    assert plan_masking(1000, graph="sparse", dropout=0.05).degree < plan_masking(1000, graph="sparse", dropout=0.2).degree
    assert plan_masking(100, graph="sparse", dropout=0.3).complete
    with pytest.raises(ConfigError):
        plan_masking(100, graph="sparse", dropout=1.0)


def test_user_threshold_is_a_floor_and_bad_requests_are_config_errors():
    assert plan_masking(10, threshold=2).threshold == 7
    assert plan_masking(10, threshold=9).threshold == 9
    with pytest.raises(ConfigError, match="exceeds the neighbourhood"):
        plan_masking(10, threshold=11)
    with pytest.raises(ConfigError, match="too small"):
        plan_masking(100, graph="sparse", degree=2)
    with pytest.raises(ConfigError, match="at least 3"):
        plan_masking(2)
    with pytest.raises(ConfigError):
        ClientPolicy(collusion=1.0)


def test_every_entry_point_plans_with_the_same_rule():
    rows = [[0.1 * i, -0.2 * i] for i in range(10)]
    import numpy as np

    result = secagg.aggregate(np.array(rows), threshold=3)
    assert result.parameters["threshold"] == plan_masking(10).threshold == 7
    grpc = plan_from_options(tuple(range(1, 11)), {"dim": 2, "clip": 1.0}, threshold=3)
    assert (grpc.threshold, grpc.degree) == (7, 9)
    sparse = plan_from_options(tuple(range(1, 101)), {"dim": 2, "clip": 1.0, "graph": "sparse"}, threshold=None)
    plan = plan_masking(100, graph="sparse")
    assert (sparse.threshold, sparse.degree) == (plan.threshold, plan.degree)


def test_the_documented_table_is_what_the_planner_gives():
    text = DOC.read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (complete|\d+) \| (\d+) \| (\d+) \|$", text, re.M)
    assert len(rows) >= 8
    for n, c, t, tol, k, st, stol in rows:
        n = int(n)
        complete, sparse = plan_masking(n), plan_masking(n, graph="sparse", dropout=0.1)
        assert (complete.colluders, complete.threshold, complete.tolerated_dropouts) == (int(c), int(t), int(tol))
        assert ("complete" if sparse.complete else str(sparse.degree), sparse.threshold, sparse.tolerated_dropouts) \
            == (k, int(st), int(stol))
