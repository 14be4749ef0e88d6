import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import secagg
from secagg import wire
from secagg.errors import (
    ConfigError,
    InputError,
    MaliciousServerDetected,
    NotEnoughSurvivors,
    ReplayError,
    SecAggError,
    SessionAborted,
    UnexpectedMessage,
    WireError,
)
from secagg.keys import IdentityKey
from secagg.protocol.client import TRANSITIONS, ClientState
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.messages import (
    ConsistencyRequest,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from secagg.protocol.plan import plan_masking
from tests.protocol_harness import make_round, run_until, server_seal, step

STAGES = [s.value for s in Stage]


def exact_sum(updates, included):
    return updates[list(included)].sum(axis=0)


@pytest.mark.parametrize("graph", ["complete", "sparse"])
@pytest.mark.parametrize("stage", STAGES)
def test_exact_sum_with_dropouts_at_each_stage(stage, graph):
    rng = np.random.default_rng(1)
    n = 24 if graph == "sparse" else 9
    updates = rng.uniform(-1, 1, (n, 50))
    dropped = [1, 4] if graph == "complete" else [2, 3]
    result = secagg.aggregate(updates, graph=graph, dropouts={stage: dropped}, degree=12 if graph == "sparse" else None)
    counted_out = stage in ("advertise", "share", "masked_input")
    assert set(result.included) == (set(range(n)) - set(dropped) if counted_out else set(range(n)))
    np.testing.assert_allclose(result.total, exact_sum(updates, result.included), atol=result.max_quantization_error)
    assert result.dropped[stage] == tuple(dropped)
    if graph == "sparse":
        assert result.parameters["degree"] == 12


def test_dropouts_at_every_stage_at_once_up_to_n_minus_t():
    rng = np.random.default_rng(2)
    updates = rng.uniform(-1, 1, (15, 30))
    # complete graph, n = 15, up to 4 colluders: t = 10 > (15 + 4) / 2, so five clients may vanish in total.
    dropouts = {"advertise": [0], "share": [1], "masked_input": [2], "consistency": [3], "unmask": [4]}
    result = secagg.aggregate(updates, dropouts=dropouts)
    assert result.parameters["threshold"] == 10
    assert result.included == tuple(i for i in range(15) if i not in (0, 1, 2))
    np.testing.assert_allclose(result.total, exact_sum(updates, result.included), atol=result.max_quantization_error)


def test_fewer_than_t_survivors_is_a_clear_error():
    updates = np.random.default_rng(3).uniform(-1, 1, (6, 4))  # t = 4
    with pytest.raises(NotEnoughSurvivors, match="threshold is 4"):
        secagg.aggregate(updates, dropouts={"masked_input": [0, 1, 2]})


def test_dropping_during_key_sharing_does_not_kill_the_round():
    updates = np.random.default_rng(4).uniform(-1, 1, (5, 10))
    result = secagg.aggregate(updates, dropouts={"share": [2]})
    assert result.included == (0, 1, 3, 4)
    np.testing.assert_allclose(result.total, exact_sum(updates, result.included), atol=result.max_quantization_error)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 10), st.data())
def test_sum_is_correct_under_random_dropouts(n, data):
    t = plan_masking(n).threshold
    stage_of = data.draw(st.lists(st.sampled_from(STAGES + [None]), min_size=n, max_size=n))
    dropouts = {}
    for client, stage in enumerate(stage_of):
        if stage:
            dropouts.setdefault(stage, []).append(client)
    updates = data.draw(st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s).uniform(-3, 3, (n, 7))))
    vanished = sum(len(v) for v in dropouts.values())
    # Clients dropping at consistency/unmask still count, but the unmask stage needs t responders.
    if n - vanished < t:
        with pytest.raises(NotEnoughSurvivors):
            secagg.aggregate(updates, dropouts=dropouts)
        return
    result = secagg.aggregate(updates, dropouts=dropouts)
    gone_before_input = {c for s in ("advertise", "share", "masked_input") for c in dropouts.get(s, [])}
    assert set(result.included) == set(range(n)) - gone_before_input
    np.testing.assert_allclose(result.total, exact_sum(updates, result.included), atol=result.max_quantization_error)


def test_weights_scale_each_update():
    updates = np.random.default_rng(5).uniform(-1, 1, (4, 6))
    weights = [0.1, 0.2, 0.3, 0.4]
    result = secagg.aggregate(updates, weights=weights)
    np.testing.assert_allclose(result.total, (updates * np.array(weights)[:, None]).sum(0), atol=result.max_quantization_error)


def test_seed_makes_the_result_reproducible():
    updates = np.random.default_rng(6).uniform(-1, 1, (4, 64))
    a = secagg.aggregate(updates, seed=11)
    b = secagg.aggregate(updates, seed=11)
    np.testing.assert_array_equal(a.total, b.total)


def test_upload_is_four_bytes_per_parameter_plus_key_overhead():
    n, dim = 5, 20000
    updates = np.random.default_rng(7).uniform(-1, 1, (n, dim))
    for bits, width in ((32, 4), (24, 3), (16, 2)):
        per_param = secagg.aggregate(updates, bits=bits, clip=1.0, clip_mode="coordinate").bytes_up_per_param
        overhead_per_client = (per_param - width) * dim
        assert 0 < overhead_per_client < 600 * n  # keys, encrypted shares, signatures: O(n), not O(d)


@pytest.mark.parametrize(
    "updates, error",
    [
        (np.zeros(5), "2-D"),
        (np.zeros((1, 5)), "at least 2 clients"),
        (np.array([[1.0, np.nan], [0.0, 0.0]]), "NaN/inf"),
        (np.array([[1.0, np.inf], [0.0, 0.0]]), "NaN/inf"),
    ],
)
def test_bad_updates_raise_input_errors(updates, error):
    with pytest.raises(InputError, match=error):
        secagg.aggregate(updates)


def test_bad_dropout_specs_raise_config_errors():
    updates = np.zeros((4, 3))
    with pytest.raises(ConfigError, match="unknown dropout stage"):
        secagg.aggregate(updates, dropouts={"later": [1]})
    with pytest.raises(ConfigError, match="0..3"):
        secagg.aggregate(updates, dropouts={"share": [9]})
    with pytest.raises(ConfigError, match="unknown protection"):
        secagg.aggregate(updates, protection="rot13")


def test_the_old_keyword_protocol_still_works_with_a_warning():
    x = np.arange(12.0).reshape(4, 3)
    with pytest.warns(FutureWarning, match=r"aggregate\(protection='masking'\)"):
        old = secagg.aggregate(x, protocol="masking", seed=1)
    np.testing.assert_array_equal(old.total, secagg.aggregate(x, protection="masking", seed=1).total)


# -- a lying server ---------------------------------------------------------------------------


def test_server_listing_a_client_as_both_dropped_and_surviving_is_refused_by_every_client():
    session, _ = make_round(n=6)
    outgoing = run_until(session, Stage.UNMASK)
    honest = wire.open_sealed(next(iter(outgoing.values())), lambda p: session.identities[SERVER_ID])[1]
    victim = honest.survivors[0]
    lie = UnmaskRequest(honest.round_id, honest.survivors, tuple(sorted(set(honest.dropped) | {victim})), honest.signatures)
    for client_id in outgoing:
        client = session.clients[client_id]
        with pytest.raises(MaliciousServerDetected, match="both as dropped and as surviving"):
            client.receive(server_seal(session, lie))
        assert client.state is ClientState.ABORTED
        with pytest.raises(SessionAborted):  # sticky: a retried honest request reveals nothing either
            client.receive(outgoing[client_id])


def test_server_sending_different_survivor_sets_is_detected_by_the_consistency_signatures():
    session, _ = make_round(n=6)  # t = 4
    outgoing = run_until(session, Stage.CONSISTENCY)
    round_id = session.config.round_id
    everyone = tuple(sorted(outgoing))
    victim = everyone[0]
    # Group A is told the victim survived, group B that it dropped.
    group_a, group_b = everyone[:3], everyone[3:]
    view_b = tuple(c for c in everyone if c != victim)
    signatures = {}
    for c in group_a:
        reply = session.clients[c].receive(server_seal(session, ConsistencyRequest(round_id, everyone)))
        signatures[c] = wire.open_sealed(reply, lambda p: session.identities[p])[1].signature
    for c in group_b:
        reply = session.clients[c].receive(server_seal(session, ConsistencyRequest(round_id, view_b)))
        signatures[c] = wire.open_sealed(reply, lambda p: session.identities[p])[1].signature
    # Ask group B for the victim's mask key, presenting every signature of a client in view B
    # (enough to pass the threshold if signatures were not checked against the set).
    in_view_b = {k: v for k, v in signatures.items() if k in view_b}
    for c in group_b:
        request = UnmaskRequest(round_id, view_b, (victim,), in_view_b)
        with pytest.raises(MaliciousServerDetected, match="different survivor set"):
            session.clients[c].receive(server_seal(session, request))
    # Group A, asked with only its own signatures (below threshold), refuses too.
    for c in group_a:
        request = UnmaskRequest(round_id, everyone, (), {k: signatures[k] for k in group_a})
        with pytest.raises(MaliciousServerDetected, match="confirmed the survivor set"):
            session.clients[c].receive(server_seal(session, request))


def test_survivor_set_other_than_the_signed_one_is_refused():
    session, _ = make_round(n=5)
    outgoing = run_until(session, Stage.UNMASK)
    c = next(iter(outgoing))
    honest = wire.open_sealed(outgoing[c], lambda p: session.identities[SERVER_ID])[1]
    smaller = tuple(honest.survivors[1:])
    lie = UnmaskRequest(honest.round_id, smaller, (honest.survivors[0],), honest.signatures)
    with pytest.raises(MaliciousServerDetected):
        session.clients[c].receive(server_seal(session, lie))


def test_client_refuses_a_threshold_that_is_too_low():
    session, _ = make_round(n=6)
    config = session.config
    weak = RoundConfig(config.round_id, config.clients, 2, config.degree, config.dim,
                       config.bits, config.clip, config.scale, config.clip_mode, config.headroom)
    with pytest.raises(MaliciousServerDetected, match="threshold 2 is too low"):
        session.clients[1].receive(server_seal(session, weak))


def test_forged_server_messages_are_refused():
    session, _ = make_round(n=4)
    forged = wire.seal(session.config, SERVER_ID, IdentityKey.generate())
    with pytest.raises(SecAggError):
        session.clients[1].receive(forged)


# -- state machine matrix -----------------------------------------------------------------------

SERVER_MESSAGES = [RoundConfig, KeyDirectory, ShareDelivery, ConsistencyRequest, UnmaskRequest]


def _sample(msg_type, session):
    r = session.config.round_id
    return {
        RoundConfig: session.config,
        KeyDirectory: KeyDirectory(r, {}),
        ShareDelivery: ShareDelivery(r, 1, {}),
        ConsistencyRequest: ConsistencyRequest(r, (1, 2, 3)),
        UnmaskRequest: UnmaskRequest(r, (1, 2, 3), (), {}),
    }[msg_type]


def _client_in_state(state):
    session, _ = make_round(n=4)
    outgoing = session.server.start()
    client = session.clients[1]
    for stage in Stage:
        if client.state is state:
            return session, client
        outgoing = step(session, outgoing)
    return session, client


@pytest.mark.parametrize(
    "state, msg_type",
    [(s, m) for s, m in itertools.product(
        [ClientState.WAIT_CONFIG, ClientState.WAIT_DIRECTORY, ClientState.WAIT_SHARES,
         ClientState.WAIT_CONSISTENCY, ClientState.WAIT_UNMASK, ClientState.DONE], SERVER_MESSAGES)
     if m not in TRANSITIONS[s]],
)
def test_every_illegal_transition_raises_unexpected_message_and_aborts(state, msg_type):
    session, client = _client_in_state(state)
    assert client.state is state
    with pytest.raises(UnexpectedMessage, match="cannot handle"):
        client.receive(server_seal(session, _sample(msg_type, session)))
    assert client.state is ClientState.ABORTED


# -- the server survives bad clients --------------------------------------------------------------


def test_server_rejects_garbage_replays_and_impostors_and_still_completes():
    session, updates = make_round(n=6, dim=16)  # t = 4: two clients may be rejected
    server = session.server
    outgoing = server.start()
    replies = {c: session.clients[c].receive(m) for c, m in outgoing.items()}
    with pytest.raises(WireError):
        server.receive(b"\x00garbage")
    with pytest.raises(SecAggError, match="not signed"):
        server.receive(wire.encode(MaskedInput(session.config.round_id, 1, b"")))
    for c, reply in replies.items():
        server.receive(reply)
    with pytest.raises(ReplayError):
        server.receive(replies[1])
    outgoing = server.close_stage()
    with pytest.raises(UnexpectedMessage, match="late, replayed or out of order"):
        server.receive(replies[2])
    outgoing = step(session, outgoing)  # shares
    # masked input stage: client 3 sends a vector of the wrong size, signed by itself.
    bad = wire.seal(MaskedInput(session.config.round_id, 3, b"\x00" * 3), 3, session.clients[3]._identity)
    with pytest.raises(WireError, match="must be"):
        server.receive(bad)
    assert 3 in server.rejected
    # An impostor: client 4 signs a message claiming to be client 2.
    impostor = wire.seal(MaskedInput(session.config.round_id, 2, b"\x00" * 64), 4, session.clients[4]._identity)
    with pytest.raises(SecAggError, match="claiming to be from 2"):
        server.receive(impostor)
    for c, m in outgoing.items():
        if c in (3, 4):
            continue  # rejected clients are treated as dropped at this stage
        server.receive(session.clients[c].receive(m))
    outgoing = server.close_stage()
    outgoing = step(session, outgoing)
    step(session, outgoing)
    assert server.included == (1, 2, 5, 6)
    np.testing.assert_allclose(server.result, updates[[0, 1, 4, 5]].sum(0), atol=1e-6)


def test_message_from_another_round_is_a_replay():
    first, _ = make_round(n=4)
    second, _ = make_round(n=4)
    outgoing = first.server.start()
    old_reply = first.clients[1].receive(outgoing[1])
    second.server.start()
    # Same identities are not shared between the two rounds, so re-sign under round two's key for client 1.
    _, msg = wire.open_sealed(old_reply, lambda p: first.identities[p])
    replayed = wire.seal(msg, 1, second.clients[1]._identity)
    with pytest.raises(ReplayError, match="another round"):
        second.server.receive(replayed)


def test_client_unmask_answers_exactly_once():
    session, _ = make_round(n=4)
    outgoing = run_until(session, Stage.UNMASK)
    client = session.clients[1]
    reply = client.receive(outgoing[1])
    _, response = wire.open_sealed(reply, lambda p: session.identities[p])
    assert isinstance(response, UnmaskResponse)
    assert not set(response.self_seed_shares) & set(response.mask_key_shares)
    with pytest.raises(UnexpectedMessage):
        client.receive(outgoing[1])


def test_distributed_integer_noise_is_added_before_masking_and_survives_in_the_sum():
    n, dim = 5, 4000
    updates = np.zeros((n, dim))
    rng = np.random.default_rng(8)
    noise = {row: rng.integers(-50, 51, dim) for row in range(n)}
    scales = []

    def client_noise(row, d, scale):
        scales.append(scale)
        return noise[row]

    result = secagg.aggregate(updates, clip=1.0, clip_mode="coordinate", client_noise=client_noise,
                              noise_headroom=1e-4, dropouts={"masked_input": [2]})
    scale = scales[0]
    expected = sum(noise[r] for r in result.included) / scale
    np.testing.assert_allclose(result.total, expected, atol=1e-12)


def test_noise_beyond_the_reserved_headroom_is_refused():
    updates = np.zeros((3, 10))
    with pytest.raises(SecAggError, match="headroom"):
        secagg.aggregate(updates, clip=1.0, client_noise=lambda row, d, scale: np.full(d, 10**9),
                         noise_headroom=1e-6)
