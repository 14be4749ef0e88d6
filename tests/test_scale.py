"""Per-round work that is done once rather than once per message or per party.

Each test checks that a shortcut gives exactly what the long way gives, and that it does
not outlive the data it serves (no wall-clock thresholds: the timings live in
benchmarks/bench_scale.py).
"""

import numpy as np
import pytest

from secagg.errors import InvalidShare, InvalidSignature
from secagg.graph import sparse_graph
from secagg.keys import IdentityKey, KeyPair, agree, verify_signature
from secagg.protocol import client as client_module
from secagg.protocol.common import Stage, graph_of
from tests.protocol_harness import make_round, run_until, step


def test_the_graph_is_built_once_per_configuration_and_matches_a_fresh_build():
    session, _ = make_round(n=12, graph="sparse", degree=4)
    config = session.config
    assert graph_of(config) is graph_of(config)
    fresh = sparse_graph(config.clients, degree=config.degree, threshold=config.threshold, seed=config.graph_seed)
    assert all(graph_of(config).neighbours(c) == fresh.neighbours(c) for c in config.clients)
    other, _ = make_round(n=12, graph="sparse", degree=4)  # a new round has a new graph seed
    assert graph_of(other.config) is not graph_of(config)


def test_each_share_key_is_agreed_once_and_forgotten_once_shares_are_in(monkeypatch):
    calls = []
    real = client_module.agree
    monkeypatch.setattr(client_module, "agree", lambda *a, **k: calls.append(k["context"]) or real(*a, **k))
    session, updates = make_round(n=5)
    outgoing = run_until(session, Stage.MASKED_INPUT)  # keys agreed to encrypt the shares
    assert len(calls) == len(set(calls)) * 2 == 5 * 4  # both ends of a pair use the same context
    assert all(len(c._share_keys) == 4 for c in session.clients.values())
    outgoing = step(session, outgoing)  # shares decrypted with the same keys, then forgotten
    assert len(calls) == 5 * 4
    assert all(not c._share_keys for c in session.clients.values())
    outgoing = step(session, step(session, outgoing))
    assert outgoing == {}
    assert np.allclose(session.server.result, updates.sum(axis=0), atol=5 * session.server._codec.resolution)


def test_cached_public_keys_still_refuse_bad_keys_and_bad_signatures():
    identity = IdentityKey.generate()
    signature = identity.sign(b"payload")
    for _ in range(2):  # the second pass is served from the cache
        verify_signature(identity.public_bytes, signature, b"payload")
        with pytest.raises(InvalidSignature):
            verify_signature(identity.public_bytes, signature, b"payloaD")
        with pytest.raises(InvalidSignature):
            verify_signature(identity.public_bytes[:31], signature, b"payload")
    mine, peer = KeyPair.generate(), KeyPair.generate()
    first = agree(mine.private, peer.public_bytes, label=b"l", context=b"c")
    assert agree(mine.private, bytearray(peer.public_bytes), label=b"l", context=b"c") == first
    assert agree(peer.private, mine.public_bytes, label=b"l", context=b"c") == first
    with pytest.raises(InvalidShare):
        agree(mine.private, bytes(32), label=b"l", context=b"c")  # the all-zero (low-order) point
