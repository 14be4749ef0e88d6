"""A client session paused to bytes between messages finishes the round like a live one."""

import dataclasses

import numpy as np
import pytest

from secagg import wire
from secagg.errors import LocalProtocolError, MaliciousServerDetected, SessionAborted, WireError
from secagg.keys import IdentityKey
from secagg.protocol.client import ClientSession, ClientSnapshot, ClientState
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.messages import UnmaskRequest
from tests.protocol_harness import make_round, run_until, server_seal


def _identity_of(session, client_id):
    return session.clients[client_id]._identity


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_resumed_sessions_give_the_exact_sum_with_a_dropout(graph):
    session, updates = make_round(n=7, dim=16, graph=graph, degree=4 if graph == "sparse" else None)
    outgoing = session.server.start()
    for stage in Stage:
        for client_id, message in outgoing.items():
            if stage is Stage.MASKED_INPUT and client_id == 3:
                continue  # shared its keys, never uploads: its pairwise masks are recovered
            identity = _identity_of(session, client_id)
            # Every message is handled by a session rebuilt from bytes, as a Flower node does.
            resumed = ClientSession.resume(session.clients[client_id].snapshot(), identity)
            if stage is Stage.MASKED_INPUT:
                resumed.set_update(updates[client_id - 1])
            session.server.receive(resumed.receive(message))
            session.clients[client_id] = resumed
        outgoing = session.server.close_stage()
    expected = updates[[c - 1 for c in session.server.included]].sum(axis=0)
    assert 3 not in session.server.included
    codec_error = session.server._codec.sum_error_bound(len(session.server.included))
    np.testing.assert_allclose(session.server.result, expected, atol=codec_error)
    assert all(session.clients[c].state is ClientState.DONE for c in session.server.included)


def test_an_aborted_session_resumes_aborted_and_reveals_nothing():
    session2, _ = make_round(n=5)
    # Honest stages up to the unmask request, then a lying one: client 1 both alive and dropped.
    outgoing = run_until(session2, Stage.UNMASK)
    honest = wire.open_sealed(outgoing[2], lambda _: session2.identities[SERVER_ID])[1]
    lie = UnmaskRequest(honest.round_id, honest.survivors, (1,), honest.signatures)
    client = session2.clients[2]
    with pytest.raises(MaliciousServerDetected):
        client.receive(server_seal(session2, lie))
    resumed = ClientSession.resume(client.snapshot(), client._identity)
    assert resumed.state is ClientState.ABORTED
    assert resumed._held == {} and resumed._self_seed is None
    with pytest.raises(SessionAborted):
        resumed.receive(outgoing[2])


def test_a_snapshot_does_not_resume_under_another_identity_or_from_garbage():
    session, _ = make_round(n=4)
    snap = session.clients[1].snapshot()
    with pytest.raises(LocalProtocolError):
        ClientSession.resume(snap, IdentityKey.generate())
    with pytest.raises(WireError):
        ClientSession.resume(b"\x93garbage", session.clients[1]._identity)
    forged = wire.encode(dataclasses.replace(wire.decode(snap, expect=ClientSnapshot), state="teleported"))
    with pytest.raises(WireError):
        ClientSession.resume(forged, session.clients[1]._identity)
