"""A lying server and misbehaving clients, driving the real honest ClientSession / ServerSession.

Server attacks (each must be refused by every honest client, or gain the server nothing):
1. a round whose only participant is the victim, t = 1;
2. the complete-graph split: group A told "victim survived", group B "victim dropped";
3. the same split inside a SecAgg+ neighbourhood, and the old sparse defaults;
4. a tiny degree, and a graph the server tries to choose;
and a repeated round id. Client attacks (the round must survive them): short, out-of-field
and wrong shares at unmask time, a low-order X25519 advert, an undecryptable share.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from secagg.protocol.mode import plan_from_options
from secagg import wire
from secagg.errors import ConfigError, MaliciousServerDetected, ReplayError, SecAggError
from secagg.keys import IdentityKey
from secagg.protocol.client import ClientSession, ClientState
from secagg.protocol.common import SERVER_ID, Stage, graph_of
from secagg.protocol.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    EncryptedShares,
    KeyDirectory,
    RoundConfig,
    UnmaskResponse,
    consistency_payload,
)
from secagg.protocol.plan import ClientPolicy, min_threshold, plan_masking
from secagg.protocol.replay import FileRoundIds, MemoryRoundIds
from secagg.protocol.server import ServerSession
from tests.protocol_harness import make_round, run_until, server_seal, split_attack, step

# -- a lying server: the split attack ------------------------------------------------------------


def _splits(others):
    for size in range(1, len(others)):  # both groups non-empty: a one-sided "split" is the honest run
        for group_a in itertools.combinations(others, size):
            yield set(group_a), set(others) - set(group_a)


@pytest.mark.parametrize("n", [7])  # random n and splits: tests/test_protocol_properties.py
def test_complete_graph_split_attack_with_the_assumed_colluders_fails_for_every_split(n):
    """Attack 2: with c = floor((n-1)/3) colluders and t > (n + c)/2 no split yields both share kinds."""
    plan = plan_masking(n)
    colluders = set(range(n - plan.colluders + 1, n + 1))
    victim = 1
    others = [c for c in range(2, n + 1) if c not in colluders]
    for group_a, group_b in _splits(others):
        session, _ = make_round(n=n)
        seeds, keys, refused = split_attack(session, victim, colluders, group_a, group_b)
        assert len(seeds) < plan.threshold or len(keys) < plan.threshold


def test_complete_graph_split_attack_succeeds_with_one_colluder_more_than_assumed():
    """The bound is tight: 2t - n colluders (one more than assumed at n = 7) do split the view."""
    n = 7
    plan = plan_masking(n)  # t = 5, c = 2
    colluders = set(range(n - (2 * plan.threshold - n) + 1, n + 1))  # 3
    session, _ = make_round(n=n)
    seeds, keys, _ = split_attack(session, 1, colluders, {2}, {3, 4})
    assert len(seeds) >= plan.threshold and len(keys) >= plan.threshold


@pytest.mark.parametrize("n", [5, 7, 8, 100])  # at n = 6 the old majority 4 is also the secure minimum
def test_the_old_majority_threshold_is_refused(n):
    """Attack 2 at the old default t = n//2 + 1: every client refuses before revealing anything."""
    session, _ = make_round(n=min(n, 8))
    clients = tuple(range(1, n + 1))
    config = RoundConfig(session.config.round_id, clients, n // 2 + 1, n - 1, 8, 32, 1.0,
                         session.config.scale, "coordinate", 0.0)
    with pytest.raises(MaliciousServerDetected, match=f"threshold {n // 2 + 1} is too low"):
        session.clients[1].receive(server_seal(session, config))


def test_a_round_of_one_with_t_1_is_refused_in_process_and_over_grpc():
    """Attack 1: the victim alone, t = 1."""
    session, _ = make_round(n=4)
    alone = RoundConfig(session.config.round_id, (1,), 1, 1, 8, 32, 1.0, session.config.scale, "coordinate", 0.0)
    with pytest.raises(MaliciousServerDetected, match="at least 3"):
        session.clients[1].receive(server_seal(session, alone))
    assert session.clients[1].state is ClientState.ABORTED
    with pytest.raises(ConfigError, match="at least 3 participants"):
        plan_from_options((1,), {"dim": 8, "clip": 1.0}, threshold=1)


def test_survivor_sets_smaller_than_the_policy_minimum_are_refused():
    session, _ = make_round(n=4, policy=ClientPolicy(min_participants=4))
    outgoing = run_until(session, Stage.CONSISTENCY)
    rid = session.config.round_id
    with pytest.raises(MaliciousServerDetected, match="at least 4"):
        session.clients[1].receive(server_seal(session, ConsistencyRequest(rid, (1, 2, 3))))
    assert outgoing


# -- SecAgg+ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, t", [(100, 34, 18), (1000, 38, 20)])
def test_the_old_sparse_defaults_are_refused(n, k, t):
    """Attack 3: the old SecAgg+ defaults needed 2t - (k + 1) = 1 colluding neighbour."""
    session, _ = make_round(n=4)
    config = RoundConfig(session.config.round_id, tuple(range(1, n + 1)), t, k, 8, 32, 1.0,
                         session.config.scale, "coordinate", 0.0)
    with pytest.raises(MaliciousServerDetected, match="too low|too small"):
        session.clients[1].receive(server_seal(session, config))


def test_sparse_split_inside_a_neighbourhood_with_the_assumed_colluders_fails():
    """Attack 3 on a real SecAgg+ round: 16 clients, degree 12, t = 10, 5 colluders (all assumed) placed
    in the victim's neighbourhood after the graph is known, for several splits of its honest neighbours."""
    n, degree = 16, 12
    colluders = ClientPolicy().colluders(n)
    for n_a in (0, 3, degree - colluders):
        session, _ = make_round(n=n, graph="sparse", degree=degree)
        assert (session.config.degree, session.config.threshold) == (degree, 10)
        seeds, keys, _ = _sparse_split(session, 1, colluders, n_a)
        assert len(seeds) < session.config.threshold or len(keys) < session.config.threshold


def _sparse_split(session, victim, n_colluders, n_a):
    """The split attack with every role inside the victim's neighbourhood of this very round.

    Only the victim's neighbours hold its shares, so the others play no part.
    """
    outgoing = run_until(session, Stage.CONSISTENCY)  # the graph exists once the adverts are in
    near = sorted(session.server.graph.neighbours(victim) - {victim})
    colluders = set(near[:n_colluders])
    honest = [c for c in near if c not in colluders]
    group_a, group_b = set(honest[:n_a]), set(honest[n_a:])
    return split_attack(session, victim, colluders, group_a, group_b, outgoing=outgoing)


def test_planned_sparse_parameters_pass_every_clients_check_and_account_for_seed_grinding():
    policy = ClientPolicy()
    for n in (100, 1000):
        plan = plan_masking(n, graph="sparse")
        assert plan.degree < n - 1
        assert min_threshold(n, plan.degree, policy) == plan.threshold
        # The same check without the 2^40 seed tries would accept a lower threshold.
        ungrinded = min_threshold(n, plan.degree, ClientPolicy(grinding_bits=0))
        assert ungrinded <= plan.threshold


# -- the graph seed --------------------------------------------------------------------------------


def test_a_tiny_degree_is_refused():
    """Attack 4: degree 2, where a ground seed makes the victim's two neighbours colluders."""
    session, _ = make_round(n=4)
    config = RoundConfig(session.config.round_id, tuple(range(1, 101)), 3, 2, 8, 32, 1.0,
                         session.config.scale, "coordinate", 0.0)
    with pytest.raises(MaliciousServerDetected, match="degree 2 is too small"):
        session.clients[1].receive(server_seal(session, config))


def test_every_client_derives_the_graph_from_the_signed_adverts_and_a_different_view_is_caught():
    """Attack 4: the seed is a hash of all adverts; a client shown other adverts signs another digest."""
    session, _ = make_round(n=16, graph="sparse", degree=12)
    run_until(session, Stage.MASKED_INPUT)
    server = session.server
    for c, client in session.clients.items():
        assert client._digest == server._digest
        assert client._neighbours == graph_of(session.config, server._digest).neighbours(c)
    # A second round where the server hides one advert from client 1 (to give it another graph).
    session, _ = make_round(n=16, graph="sparse", degree=12)
    outgoing = step(session, session.server.start())
    _, directory = wire.open_sealed(outgoing[1], lambda p: session.identities[p])
    hidden = next(c for c in directory.adverts if c != 1)
    partial = KeyDirectory(directory.round_id, {c: a for c, a in directory.adverts.items() if c != hidden})
    session.clients[1].receive(server_seal(session, partial))
    assert session.clients[1]._digest != session.server._digest
    payload = consistency_payload(session.config.round_id, session.server._digest, tuple(range(1, 17)))
    own_view = consistency_payload(session.config.round_id, session.clients[1]._digest, tuple(range(1, 17)))
    assert payload != own_view  # its signature never counts for the others' view, nor theirs for its own


# -- repeated round ids ----------------------------------------------------------------------------


def test_a_client_never_signs_in_the_same_round_id_twice():
    session, _ = make_round(n=4)
    step(session, session.server.start())
    again = ServerSession(session.config, session.server_identity, session.identities)
    repeat = {c: ClientSession(c, session.clients[c]._identity, session.identities, update=np.zeros(8))
              for c in session.clients}
    for c, message in again.start().items():
        with pytest.raises(ReplayError, match="already took part"):
            repeat[c].receive(message)


def test_round_ids_survive_a_restart_and_the_store_stays_bounded(tmp_path):
    path = tmp_path / "round-ids.txt"
    store = FileRoundIds(path, capacity=4)
    store.claim(b"c" * 32, b"s" * 32, b"r" * 16)
    with pytest.raises(ReplayError):
        FileRoundIds(path, capacity=4).claim(b"c" * 32, b"s" * 32, b"r" * 16)  # a restarted client
    FileRoundIds(path).claim(b"c" * 32, b"t" * 32, b"r" * 16)  # another server may use the same id
    for i in range(20):
        store.claim(b"c" * 32, b"s" * 32, bytes([i]) * 16)
    assert len(store) == 4 and len(path.read_text().split()) <= 8 + 1
    memory = MemoryRoundIds(capacity=2)
    memory.claim(b"a", b"b", b"1" * 16)
    with pytest.raises(ReplayError):
        memory.claim(b"a", b"b", b"1" * 16)


# -- malicious clients: the round survives ----------------------------------------------------------


def _tamper(session, client_id, sealed, change):
    _, msg = wire.open_sealed(sealed, lambda p: session.identities[p])
    return wire.seal(change(msg), client_id, session.clients[client_id]._identity)


def _finish_with_bad_unmask(session, bad_client, change):
    outgoing = run_until(session, Stage.UNMASK)
    for c, message in outgoing.items():
        reply = session.clients[c].receive(message)
        if c == bad_client:
            reply = _tamper(session, c, reply, change)
        try:
            session.server.receive(reply)
        except SecAggError:
            assert c == bad_client
    session.server.close_stage()
    return session.server


def _replace_seed_shares(msg, share_for):
    seeds = {o: share_for(o, s) for o, s in msg.self_seed_shares.items()}
    return UnmaskResponse(msg.round_id, msg.client, seeds, msg.mask_key_shares, msg.unusable)


@pytest.mark.parametrize("kind", ["short", "out_of_field"])
def test_a_malformed_share_gets_its_sender_rejected_with_evidence_and_the_round_completes(kind):
    session, updates = make_round(n=6)
    bad = {"short": lambda o, s: s[:-1], "out_of_field": lambda o, s: b"\xff" * len(s)}[kind]
    server = _finish_with_bad_unmask(session, 3, lambda m: _replace_seed_shares(m, bad))
    assert set(server.rejected) == {3} and 3 in server.evidence
    sender, _ = wire.open_sealed(server.evidence[3], lambda p: session.identities[p])
    assert sender == 3  # the evidence is the culprit's own signed message
    np.testing.assert_allclose(server.result, updates.sum(0), atol=1e-6)


def test_wrong_but_well_formed_shares_are_decoded_around_and_no_honest_client_is_named():
    session, updates = make_round(n=9)  # t = 6: 9 shares correct (9 - 6) / 2 = 1 wrong one

    def wrong(owner, share):
        value = bytearray(share)
        value[0] ^= 1
        return bytes(value)

    server = _finish_with_bad_unmask(session, 4, lambda m: _replace_seed_shares(m, wrong))
    assert server.rejected == {}
    assert set(server.suspects) == {4}  # only the liar, with its signed response as evidence
    assert wire.open_sealed(server.evidence[4], lambda p: session.identities[p])[0] == 4
    np.testing.assert_allclose(server.result, updates.sum(0), atol=1e-6)


def test_a_low_order_key_advert_is_refused_before_it_is_relayed():
    session, updates = make_round(n=6)
    outgoing = session.server.start()
    low_order = bytes(32)  # the identity point: every exchange with it gives zero
    for c, message in outgoing.items():
        reply = session.clients[c].receive(message)
        if c == 2:
            reply = _tamper(session, 2, reply, lambda m: AdvertiseKeys(m.round_id, 2, low_order, m.mask_public_key))
            with pytest.raises(SecAggError, match="low-order"):
                session.server.receive(reply)
            continue
        session.server.receive(reply)
    outgoing = session.server.close_stage()
    _, directory = wire.open_sealed(next(iter(outgoing.values())), lambda p: session.identities[p])
    assert 2 not in directory.adverts and 2 in session.server.rejected
    for stage in (Stage.SHARE, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK):
        outgoing = step(session, outgoing)
    kept = [c - 1 for c in session.server.included]
    assert 2 not in session.server.included
    np.testing.assert_allclose(session.server.result, updates[kept].sum(0), atol=1e-6)


def test_a_relayed_low_order_key_is_blamed_on_the_server():
    session, _ = make_round(n=4)
    outgoing = step(session, session.server.start())
    _, directory = wire.open_sealed(outgoing[1], lambda p: session.identities[p])
    forged = AdvertiseKeys(directory.round_id, 2, bytes(32), b"\x09" + bytes(31))
    adverts = dict(directory.adverts)
    adverts[2] = wire.seal(forged, 2, session.clients[2]._identity)
    with pytest.raises(MaliciousServerDetected, match="low-order"):
        session.clients[1].receive(server_seal(session, KeyDirectory(directory.round_id, adverts)))


def test_an_undecryptable_share_is_reported_and_the_round_goes_on():
    session, updates = make_round(n=6)
    outgoing = step(session, session.server.start())
    for c, message in outgoing.items():
        reply = session.clients[c].receive(message)
        if c == 5:  # client 5 sends garbage to client 1 instead of its share
            def spoil(m):
                ciphertexts = dict(m.ciphertexts)
                ciphertexts[1] = b"\x00" * len(ciphertexts[1])
                return EncryptedShares(m.round_id, 5, ciphertexts, m.commitment)
            reply = _tamper(session, 5, reply, spoil)
        session.server.receive(reply)
    outgoing = session.server.close_stage()
    for stage in (Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK):
        outgoing = step(session, outgoing)
    assert all(c.state is ClientState.DONE for c in session.clients.values())
    assert session.server.disputes == {1: (5,)}
    assert session.server.rejected == {}
    np.testing.assert_allclose(session.server.result, updates.sum(0), atol=1e-6)


def test_forged_server_identity_still_refused():
    session, _ = make_round(n=4)
    with pytest.raises(SecAggError):
        session.clients[1].receive(wire.seal(session.config, SERVER_ID, IdentityKey.generate()))
