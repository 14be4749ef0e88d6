"""The ckks round's sans-IO sessions: stage order, sticky failure, and what each refuses."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")

from secagg import wire
from secagg.ckks import HeParams, HeRoundConfig, new_round_id
from secagg.ckks.messages import CkksBatchReceived, CkksDecryptRequest, CkksSplitUpload
from secagg.ckks.session import ClientStage, ServerStage
from secagg.ckks.simulate import round_sessions, run_round
from secagg.errors import (
    ConfigError,
    MaliciousServerDetected,
    NotEnoughSurvivors,
    RemoteProtocolError,
    ReplayError,
    SessionAborted,
)

DIM = 10


def sessions(n: int = 3, forward_bytes: int | None = None, **kw):
    x = np.linspace(-0.5, 0.5, n * DIM).reshape(n, DIM)
    config = HeRoundConfig(new_round_id(), DIM, n, kw.pop("params", HeParams.ckks()), **kw)
    server, parties = round_sessions(config, x, **({} if forward_bytes is None else {"forward_bytes": forward_bytes}))
    return x, config, server, parties


def to_decrypt_stage(config, server, parties):
    """Run the context and upload stages; the first decrypt-stage message for the key holder."""
    holder = config.n_clients
    server.receive(holder, parties[holder].receive(server.start()[holder]))
    for c, reply in deliver(parties, server.close_stage()).items():
        server.receive(c, reply)
    (request,) = server.close_stage().values()
    return holder, request


def deliver(parties, out):
    """Each addressed party's reply to its message (as a link would carry them)."""
    return {pid: parties[pid].receive(payload) for pid, payload in out.items()}


def test_in_process_round_is_the_sum_and_every_session_ends_done():
    x, _config, server, parties = sessions()
    out = run_round(server, parties)
    assert out.included == (0, 1, 2) and server.stage is ServerStage.DONE
    assert np.max(np.abs(out.total - x.sum(0))) <= out.error_bound
    assert all(p.done for p in parties.values())


def test_an_upload_on_another_clients_stream_is_refused_before_it_is_added():
    """A client replaying a peer's signed upload as its own: refused, the sum unchanged."""
    x, config, server, parties = sessions()
    holder = config.n_clients  # the in-process key holder's id
    server.receive(holder, parties[holder].receive(server.start()[holder]))
    uploads = deliver({c: parties[c] for c in range(3)}, server.close_stage())
    with pytest.raises(RemoteProtocolError, match="arrived from party 0"):
        server.receive(0, uploads[1])
    assert server.he_servers[0].included == () and 0 in server.rejected
    assert server.awaiting() == {1, 2}  # the refused client is out of the round
    server.receive(1, uploads[1])
    server.receive(2, uploads[2])
    with pytest.raises(ReplayError, match="did not ask for"):
        server.receive(1, uploads[1])
    server.receive(holder, deliver(parties, server.close_stage())[holder])
    server.close_stage()
    out = server.outcome()
    assert out.included == (1, 2)
    assert np.max(np.abs(out.total - x[1:].sum(0))) <= out.error_bound


def test_a_split_upload_is_checked_for_every_key_holder_before_any_part_is_added():
    """Part 1 of a split upload is another client's: no key holder's sum takes the client."""
    x, _config, server, parties = sessions(params=HeParams.bfv(), key_holders=2)
    for h, reply in deliver(parties, server.start()).items():
        server.receive(h, reply)
    uploads = {c: wire.decode(parties[c].receive(p), expect=CkksSplitUpload)
               for c, p in server.close_stage().items()}
    mixed = CkksSplitUpload(0, (uploads[0].uploads[0], uploads[1].uploads[1]))
    with pytest.raises(RemoteProtocolError):
        server.receive(0, wire.encode(mixed))
    assert [he.included for he in server.he_servers] == [(), ()]
    for c in (1, 2):
        server.receive(c, wire.encode(uploads[c]))
    for h, reply in deliver(parties, server.close_stage()).items():
        server.receive(h, reply)
    server.close_stage()
    out = server.outcome()
    assert out.included == (1, 2) and np.max(np.abs(out.total - x[1:].sum(0))) <= out.error_bound


def test_a_key_holder_that_caught_a_lying_server_stays_failed():
    _x, config, server, parties = sessions()
    holder = config.n_clients
    server.receive(holder, parties[holder].receive(server.start()[holder]))
    for c, reply in deliver(parties, server.close_stage()).items():
        server.receive(c, reply)
    (request,) = server.close_stage().values()
    honest = wire.decode(request, expect=CkksDecryptRequest)
    dropped = CkksDecryptRequest(0, 0, 1, honest.aggregate, honest.uploads[:2])  # hides an upload from the check
    with pytest.raises(MaliciousServerDetected):
        parties[holder].receive(wire.encode(dropped))
    assert parties[holder].stage.value == "failed"
    with pytest.raises(SessionAborted):  # the honest request does not get a second decryption
        parties[holder].receive(request)


def test_uploads_reach_the_key_holder_in_batches_of_bounded_size_and_the_sum_is_exact():
    """forward_bytes below one upload: one upload per decrypt-stage message, each confirmed."""
    x, config, server, parties = sessions(n=5, forward_bytes=1)
    holder, request = to_decrypt_stage(config, server, parties)
    keys = {holder: parties[holder].identity.public_bytes}.get
    for index in range(5):
        batch = wire.decode(request, expect=CkksDecryptRequest)
        assert (batch.index, batch.count, len(batch.uploads)) == (index, 5, 1)
        assert bool(batch.aggregate) == (index == 0)
        reply = parties[holder].receive(request)
        if index < 4:
            assert wire.open_sealed(reply, keys, expect=CkksBatchReceived)[1].checked == index + 1
            assert server.stage is ServerStage.DECRYPT and parties[holder].stage.value == "decrypt"
        server.receive(holder, reply)
        out = server.close_stage()
        if index < 4:
            (request,) = out.values()
    out = server.outcome()
    assert out.included == (0, 1, 2, 3, 4) and parties[holder].done
    assert np.max(np.abs(out.total - x.sum(0))) <= out.error_bound


def test_a_key_holder_refuses_a_skipped_batch_and_a_batch_of_unlisted_uploads_for_good():
    _x, config, server, parties = sessions(n=4, forward_bytes=1)
    holder, request = to_decrypt_stage(config, server, parties)
    first = wire.decode(request, expect=CkksDecryptRequest)
    parties[holder].receive(request)
    skipped = CkksDecryptRequest(0, 2, first.count, b"", first.uploads)  # batch 1 never sent
    with pytest.raises(ReplayError, match="expected batch 1"):
        parties[holder].receive(wire.encode(skipped))
    assert parties[holder].stage.value == "failed"
    # a fresh round: the server forwards client 0's upload twice (once in place of client 1's)
    _x, config, server, parties = sessions(n=4, forward_bytes=1)
    holder, request = to_decrypt_stage(config, server, parties)
    first = wire.decode(request, expect=CkksDecryptRequest)
    parties[holder].receive(request)
    with pytest.raises(ReplayError, match="already uploaded"):
        parties[holder].receive(wire.encode(CkksDecryptRequest(0, 1, first.count, b"", first.uploads)))
    with pytest.raises(SessionAborted):
        parties[holder].receive(wire.encode(CkksDecryptRequest(0, 1, first.count, b"", first.uploads)))


def test_a_round_without_the_key_holders_keys_fails_and_stays_failed():
    _, _, server, _parties = sessions()
    server.start()
    assert server.awaiting() == {3}
    with pytest.raises(NotEnoughSurvivors, match="did not send the round's keys"):
        server.close_stage()
    assert server.stage is ServerStage.FAILED
    for call in (server.close_stage, lambda: server.receive(3, b"x"), server.start):
        with pytest.raises(SessionAborted):
            call()


def test_a_client_answers_only_its_stage_and_refuses_a_garbled_context_for_good():
    _, _, _server, parties = sessions()
    client = parties[0]
    assert client.stage is ClientStage.CONTEXT
    with pytest.raises(ConfigError, match="not a valid message signed by the key holder"):
        client.receive(b"not a context")
    assert client.stage is ClientStage.FAILED
    with pytest.raises(SessionAborted):
        client.receive(b"anything")


def test_a_key_holder_resumed_from_its_snapshot_before_every_message_releases_the_same_sum():
    """A Flower node keeps no object between messages: the key holder (a participant here) is
    rebuilt from its snapshot each time, through keys, its own upload and batched checking."""
    from secagg.ckks.session import ClientSession, Roster, ServerSession
    from secagg.keys import IdentityKey

    n = 4
    x = np.linspace(-0.5, 0.5, n * DIM).reshape(n, DIM)
    config = HeRoundConfig(new_round_id(), DIM, n, HeParams.ckks())
    ids = [IdentityKey.generate() for _ in range(n)]
    server_id = IdentityKey.generate()
    roster = Roster(0, tuple(range(n)), (0,), {i: k.public_bytes for i, k in enumerate(ids)}, (ids[0].public_bytes,),
                    server_id.public_bytes)
    server = ServerSession(config, roster, server_id, forward_bytes=1)
    others = {i: ClientSession(config, roster, i, ids[i], x[i]) for i in range(1, n)}
    saved = b""

    def holder_receives(payload):
        nonlocal saved
        holder = ClientSession(config, roster, 0, ids[0], None)
        if saved:
            holder.restore(saved)
        if holder.stage is ClientStage.CONTEXT:
            holder.set_update(x[0])
        try:
            return holder.receive(payload)
        finally:
            saved = holder.snapshot()

    out = server.start()
    while not server.done:
        for pid, payload in out.items():
            server.receive(pid, holder_receives(payload) if pid == 0 else others[pid].receive(payload))
        out = server.close_stage()
    result = server.outcome()
    assert result.included == (0, 1, 2, 3)
    assert np.max(np.abs(result.total - x.sum(0))) <= result.error_bound
    with pytest.raises(ReplayError, match="did not expect"):
        holder_receives(b"a second decryption request")  # resumed DONE: nothing more is answered


def test_a_split_round_forwards_each_key_holders_uploads_in_the_same_batches():
    """Two BFV key holders, one upload per message each: both confirm every batch, the sum is exact."""
    x, _config, server, parties = sessions(n=4, forward_bytes=1, params=HeParams.bfv(), key_holders=2)
    out = run_round(server, parties)
    assert out.included == (0, 1, 2, 3)
    assert np.max(np.abs(out.total - x.sum(0))) <= out.error_bound
    assert [parties[h].batches for h in (4, 5)] == [4, 4] and all(parties[h].done for h in (4, 5))
