import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.errors import ConfigError
from secagg.graph import complete_graph, sparse_graph


@settings(max_examples=40, deadline=None)
@given(st.integers(5, 120).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, (n - 2) // 2).map(lambda h: 2 * h))))
def test_sparse_graph_is_symmetric_and_k_regular(n_k):
    n, k = n_k
    clients = tuple(range(1, n + 1))
    graph = sparse_graph(clients, degree=k, threshold=k // 2 + 1, seed=os.urandom(32))
    for u in clients:
        near = graph.neighbours(u)
        assert u in near
        assert len(near) == (n if graph.complete else k + 1)
        for v in near:
            assert u in graph.neighbours(v)


def test_the_graph_depends_only_on_the_public_seed():
    clients = tuple(range(1, 41))
    seed = os.urandom(32)
    a = sparse_graph(clients, degree=6, threshold=4, seed=seed)
    b = sparse_graph(clients, degree=6, threshold=4, seed=seed)
    c = sparse_graph(clients, degree=6, threshold=4, seed=os.urandom(32))
    assert all(a.neighbours(u) == b.neighbours(u) for u in clients)
    assert any(a.neighbours(u) != c.neighbours(u) for u in clients)


def test_bad_graph_parameters():
    with pytest.raises(ConfigError, match="even"):
        sparse_graph(tuple(range(1, 20)), degree=5, threshold=3, seed=b"")
    with pytest.raises(ConfigError, match="threshold"):
        complete_graph((1, 2, 3), threshold=4)
