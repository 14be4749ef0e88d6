"""Random, well-signed but ill-meant client messages never crash the server state machine."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import wire
from secagg.errors import SecAggError
from secagg.protocol.common import Stage
from secagg.protocol.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShares,
    MaskedInput,
    UnmaskResponse,
)
from secagg.protocol.server import ServerState
from tests.protocol_harness import make_round, run_until

small_bytes = st.binary(max_size=80)
ids = st.integers(-2, 9)


def client_messages(round_id):
    rid = st.one_of(st.just(round_id), st.binary(min_size=16, max_size=16))
    return st.one_of(
        st.builds(AdvertiseKeys, rid, ids, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32)),
        st.builds(EncryptedShares, rid, ids, st.dictionaries(ids, small_bytes, max_size=6), st.binary(min_size=0, max_size=40)),
        st.builds(MaskedInput, rid, ids, st.binary(max_size=64)),
        st.builds(ConsistencySignature, rid, ids, st.binary(max_size=64)),
        st.builds(UnmaskResponse, rid, ids, st.dictionaries(ids, small_bytes, max_size=6), st.dictionaries(ids, small_bytes, max_size=6)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(list(Stage)), st.data())
def test_server_only_raises_typed_errors_and_then_finishes_the_round(stage, data):
    session, updates = make_round(n=5, dim=8)
    outgoing = run_until(session, stage)
    try:
        msg = data.draw(client_messages(session.config.round_id))
    except (ValueError, TypeError):
        return  # the message type itself refused these fields (its own invariants)
    signer = data.draw(st.sampled_from(session.client_ids))
    attacker = session.clients[signer]
    accepted = False
    try:
        session.server.receive(wire.seal(msg, signer, attacker._identity))
        accepted = True
    except SecAggError:
        pass
    assert session.server.state is ServerState.COLLECTING
    # The honest clients (minus the one whose identity was used) still complete the round.
    for current in list(Stage)[list(Stage).index(stage):]:
        for client_id, message in outgoing.items():
            if client_id == signer or client_id in session.gone:
                continue
            try:
                session.server.receive(session.clients[client_id].receive(message))
            except SecAggError:
                session.gone.add(client_id)
        outgoing = session.server.close_stage()
    assert session.server.state is ServerState.DONE
    included = list(session.server.included)
    if accepted and isinstance(msg, MaskedInput):
        return  # the signer's (random) input legitimately counts
    np.testing.assert_allclose(session.server.result, updates[[c - 1 for c in included]].sum(0), atol=1e-6)
