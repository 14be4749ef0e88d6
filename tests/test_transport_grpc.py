"""gRPC transport with mutual TLS, in one process: real TLS, real certificates, real protocol.

Every test starts its own server on a free loopback port. Misbehaving clients are real
gRPC clients that send garbage, replay, flood or stall; the round must still complete
with the honest clients and the server must log why each client was dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
import numpy as np
import pytest

from federation.transport import frames
from federation.transport.certs import Credentials
from federation.transport.frames import Hello
from federation.transport.grpc_client import ClientSettings, channel_options, run_client
from federation.transport.grpc_server import AggregationServer, ServerSettings
from secagg import wire
from secagg.keys import IdentityKey
from secagg.plain import PlainUpdate
from secagg.protocol.mode import MaskingClientRound

DIM = 64


def creds(pki, cid: int, ca: str = "ca") -> Credentials:
    return Credentials.load(pki / ca / f"client-{cid}")


def update(cid: int, rnd: int) -> np.ndarray:
    return np.random.default_rng([cid, rnd]).normal(0, 1, DIM).astype(np.float32)


def settings(**kw) -> ServerSettings:
    base = {
        "protection": "masking", "options": {"dim": DIM, "clip": 50.0}, "expected_clients": 5, "threshold": 3,
        "join_timeout": 20.0, "stage_timeout": 10.0, "rounds": 1,
    }
    base.update(kw)
    return ServerSettings(**base)


async def with_server(pki, s: ServerSettings, clients):
    """Start a server, run ``clients(port)`` (a coroutine factory) next to it, return both results."""
    server = AggregationServer(s, Credentials.load(pki / "ca" / "server"))
    port = await server.start()
    try:
        serving = asyncio.ensure_future(server.serve())
        client_results = await asyncio.wait_for(clients(port), 60)
        reports = await asyncio.wait_for(serving, 60)
    finally:
        await server.stop(0)
    return reports, client_results


def honest(pki, port, cids, keyholder: int | None = 1, **kw):
    cs = ClientSettings(server=f"localhost:{port}", keyholder=keyholder)
    return [run_client(cs, creds(pki, c), lambda r, c=c: update(c, r), **kw) for c in cids]


def test_masking_rounds_over_mutual_tls(pki):
    async def clients(port):
        return await asyncio.gather(*honest(pki, port, range(1, 6)))

    reports, results = asyncio.run(with_server(pki, settings(rounds=2), clients))
    for rnd, report in enumerate(reports):
        assert report.ok and report.outcome.included == (1, 2, 3, 4, 5)
        expected = sum(update(c, rnd).astype(np.float64) for c in range(1, 6))
        np.testing.assert_allclose(report.outcome.total, expected, atol=1e-3)
        for res in results:  # every client received the released aggregate
            np.testing.assert_allclose(res.rounds[rnd], report.outcome.total)


async def _expect_refused(target: str, channel_creds) -> grpc.StatusCode:
    async with grpc.aio.secure_channel(target, channel_creds) as ch:
        call = ch.stream_stream(frames.METHOD)()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.write(b"x")
            await call.read()
        return err.value.code()


def test_refusals_no_certificate_other_ca_identity_mismatch(pki, caplog):
    ca_pem = (pki / "ca" / "ca.pem").read_bytes()

    async def clients(port):
        target = f"localhost:{port}"
        codes = {}
        # 1. no client certificate: the TLS handshake fails
        codes["no_cert"] = await _expect_refused(target, grpc.ssl_channel_credentials(root_certificates=ca_pem))
        # 2. a certificate from another CA: the TLS handshake fails
        evil = creds(pki, 1, "evil")
        codes["other_ca"] = await _expect_refused(target, grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=evil.key_pem, certificate_chain=evil.cert_pem))
        # 3. plaintext: no insecure port exists
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                call = ch.stream_stream(frames.METHOD)()
                await call.write(b"x")
                await call.read()
            codes["plaintext"] = err.value.code()
        # 4. valid certificate for client 6, but messages sealed with another Ed25519 key
        good = creds(pki, 6)
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(
                root_certificates=ca_pem, private_key=good.key_pem, certificate_chain=good.cert_pem),
                options=channel_options(ClientSettings())) as ch:
            call = ch.stream_stream(frames.METHOD)()
            await call.write(wire.seal(Hello(client_id=6, software="t"), 6, IdentityKey.generate()))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            codes["mismatch"] = err.value.code()
        # 5. valid certificate for client 7, hello claiming to be client 8 (signed by 7's key)
        c7 = creds(pki, 7)
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(
                root_certificates=ca_pem, private_key=c7.key_pem, certificate_chain=c7.cert_pem)) as ch:
            call = ch.stream_stream(frames.METHOD)()
            await call.write(wire.seal(Hello(client_id=8, software="t"), 8, c7.identity))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            codes["claims_other_id"] = err.value.code()
        # the honest clients still complete their round
        return codes, await asyncio.gather(*honest(pki, port, range(1, 4)))

    caplog.set_level(logging.INFO, logger="secagg.server")
    reports, (codes, _) = asyncio.run(with_server(pki, settings(expected_clients=3, threshold=2), clients))
    assert codes["no_cert"] == grpc.StatusCode.UNAVAILABLE
    assert codes["other_ca"] == grpc.StatusCode.UNAVAILABLE
    assert codes["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert codes["mismatch"] == grpc.StatusCode.PERMISSION_DENIED
    assert codes["claims_other_id"] == grpc.StatusCode.PERMISSION_DENIED
    assert "refused client 6" in caplog.text and "identity mismatch" in caplog.text
    assert "refused client 7" in caplog.text
    assert reports[0].ok and reports[0].outcome.included == (1, 2, 3)


class _Staller:
    """Answers the first server message (advertise), then never again: a dead client."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def receive(self, payload):
        self.calls += 1
        return self.inner.receive(payload) if self.calls == 1 else None

    done = False


async def _raw_client(pki, port, cid, behaviour):
    c = creds(pki, cid)
    ch_creds = grpc.ssl_channel_credentials(
        root_certificates=c.ca_pem, private_key=c.key_pem, certificate_chain=c.cert_pem)
    async with grpc.aio.secure_channel(f"localhost:{port}", ch_creds, options=channel_options(ClientSettings())) as ch:
        call = ch.stream_stream(frames.METHOD)()
        await call.write(wire.seal(Hello(client_id=cid, software="t"), cid, c.identity))
        try:
            await behaviour(call, c)
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass
        except asyncio.InvalidStateError:
            pass  # the server ended the stream while this client was still writing


async def _garbage(call, c):
    await call.read()  # RoundStart
    await call.write(os.urandom(200))


async def await_stage_request(call):
    """Read the round start, the mode's parameters and this client's first stage request.

    A message sent before the stage awaits it is discarded unread as unsolicited (the stage
    opens on the server's loop when the driver hands it over, just before the request goes
    out), so an attacker that wants its message checked by the stage sends it now.
    """
    await call.read()  # RoundStart
    complete = 0
    while complete < 2:  # two payloads: the mode's parameters, then the stage request
        chunk = wire.decode(await call.read(), expect=frames.Chunk)
        complete += chunk.index == chunk.count - 1


async def _flood(call, c):
    await await_stage_request(call)
    data = b"\0" * frames.MIN_CHUNK_BYTES
    for i in range(60):  # well-formed chunks of one payload, faster than the rate limit
        await call.write(wire.encode(frames.Chunk(seq=1, index=i, count=60, data=data)))


async def _oversize(call, c):
    await await_stage_request(call)
    data = b"\0" * (600 << 10)
    for i in range(2):  # 2 x 600 KiB, over the test's 1 MiB payload limit
        await call.write(wire.encode(frames.Chunk(seq=1, index=i, count=2, data=data)))


async def _forged(call, c):
    # a payload sealed as client 9 (with 9's certificate) but sent on client 8's stream
    await await_stage_request(call)
    other = creds_holder["pki"]
    nine = Credentials.load(other / "ca" / "client-9")
    payload = wire.seal(PlainUpdate(round=0, vector=b"\0" * 4 * DIM), 9, nine.identity)
    for f in frames.chunk_payload(payload, 1, frames.MIN_CHUNK_BYTES):
        await call.write(f)


creds_holder: dict = {}


def test_server_survives_garbage_flood_oversize_forgery_stall_and_replay(pki, caplog):
    creds_holder["pki"] = pki
    replay_store: dict[int, bytes] = {}

    def replaying_round(mode, ctx, params):
        inner = MaskingClientRound(ctx, params)

        class Replayer:
            done = False

            def receive(self, payload):
                reply = inner.receive(payload)
                if ctx.round == 0:
                    replay_store.setdefault(ctx.round, reply)
                    return reply
                return replay_store[0]  # round 1: replay the round-0 key advertisement

        return Replayer()

    def stalling_round(mode, ctx, params):
        return _Staller(MaskingClientRound(ctx, params))

    # 19 clients, 6 of them misbehaving: the masking plan (up to 6 colluders assumed) has t = 13.
    HONEST = (1, 2, 3, 4) + tuple(range(11, 20))

    async def clients(port):
        cs = ClientSettings(server=f"localhost:{port}")
        tasks = honest(pki, port, HONEST)
        tasks.append(run_client(cs, creds(pki, 5), lambda r: update(5, r), make_round=stalling_round))
        tasks.append(run_client(cs, creds(pki, 6), lambda r: update(6, r), make_round=replaying_round))
        tasks.append(_raw_client(pki, port, 7, _garbage))
        tasks.append(_raw_client(pki, port, 8, _forged))
        tasks.append(_raw_client(pki, port, 9, _flood))
        tasks.append(_raw_client(pki, port, 10, _oversize))
        return await asyncio.gather(*tasks)

    caplog.set_level(logging.INFO, logger="secagg.server")
    s = settings(expected_clients=19, threshold=3, rounds=2, stage_timeout=4.0, rejoin_timeout=0.5,
                 frames_per_second=20.0, frame_burst=40.0, max_message_bytes=1 << 20)
    reports, _ = asyncio.run(with_server(pki, s, clients))
    r0, r1 = reports
    assert r0.ok and r1.ok
    assert "malformed frame" in r0.dropped[7]
    assert "identity mismatch" in r0.dropped[8]
    # the flood and the oversize message are refused by the stage's own limit (77 KiB for the
    # 13-client advertise stage), at the first chunk for the flood that declares 60 chunks
    assert "60 chunks is larger than the 84992-byte limit of this stage" in r0.dropped[9]
    assert "exceeds the 84992-byte limit of this stage" in r0.dropped[10]
    assert "no reply in stage 'share' within 4s" in r0.dropped[5]
    assert 6 in r0.outcome.included
    assert "ReplayError" in r1.dropped[6] or "another round" in r1.dropped[6]
    assert r0.outcome.included == tuple(sorted(HONEST + (6,)))
    expected0 = sum(update(c, 0).astype(np.float64) for c in HONEST + (6,))
    np.testing.assert_allclose(r0.outcome.total, expected0, atol=1e-3)
    assert r1.outcome.included == HONEST
    expected1 = sum(update(c, 1).astype(np.float64) for c in HONEST)
    np.testing.assert_allclose(r1.outcome.total, expected1, atol=1e-3)
    for cid in (5, 6, 7, 8, 9, 10):
        assert f"dropped client {cid}" in caplog.text


def test_large_update_streams_in_chunks(pki):
    dim = 600_000  # 2.4 MB masked vector -> several 1 MiB chunks each way

    async def clients(port):
        cs = ClientSettings(server=f"localhost:{port}", chunk_bytes=frames.MIN_CHUNK_BYTES * 16)
        return await asyncio.gather(*[
            run_client(cs, creds(pki, c), lambda r, c=c: np.full(dim, c, dtype=np.float32)) for c in (1, 2, 3)
        ])

    s = settings(protection="masking", options={"dim": dim, "clip": 1e4, "clip_mode": "coordinate"},
                 expected_clients=3, threshold=2, max_message_bytes=8 << 20)
    reports, _ = asyncio.run(with_server(pki, s, clients))
    np.testing.assert_allclose(reports[0].outcome.total, np.full(dim, 6.0), atol=1e-2)


def test_ckks_round_fails_closed_when_the_key_holder_vanishes(pki):
    pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    from secagg.ckks.mode import CkksClientRound

    def flaky_holder(mode, ctx, params):
        inner = CkksClientRound(ctx, params)

        class Holder:
            done = False

            def receive(self, payload):
                reply = inner.receive(payload)
                return None if (ctx.round == 0 and inner.step == 3) else reply  # never returns the sum

        return Holder()

    async def reconnecting_holder(cs):
        # missing the decrypt stage disconnects the holder; it reconnects, as `secagg join --retry` does
        first = await run_client(cs, creds(pki, 1), lambda r: update(1, r), make_round=flaky_holder)
        assert not first.finished and 0 in first.dropped
        await run_client(cs, creds(pki, 1), lambda r: update(1, r), make_round=flaky_holder)
        return first

    async def clients(port):
        cs = ClientSettings(server=f"localhost:{port}", keyholder=1)
        tasks = [reconnecting_holder(cs)]
        tasks += honest(pki, port, (2, 3, 4))
        return await asyncio.gather(*tasks)

    s = settings(protection="ckks", options={"dim": DIM, "clip": 10.0}, expected_clients=4,
                 threshold=3, rounds=2, stage_timeout=4.0)
    reports, results = asyncio.run(with_server(pki, s, clients))
    r0, r1 = reports
    assert not r0.ok and "key holder did not return" in r0.reason and r0.outcome is None
    assert all(0 not in res.rounds or res.rounds[0] is None for res in results)  # nothing released
    assert r1.ok and r1.outcome.included == (1, 2, 3, 4)
    expected = sum(np.clip(update(c, 1), -10, 10).astype(np.float64) for c in (1, 2, 3, 4))
    np.testing.assert_allclose(r1.outcome.total, expected, atol=1e-4)


def test_clients_refuse_a_server_that_switches_to_no_protection(pki):
    async def clients(port):
        return await asyncio.gather(*honest(pki, port, (1, 2)))

    s = settings(protection="none", options={"dim": DIM}, expected_clients=2, threshold=2, stage_timeout=2.0)
    reports, results = asyncio.run(with_server(pki, s, clients))
    assert not reports[0].ok and "NotEnoughSurvivors" in reports[0].reason
    assert all(res.failed[0] == "refused protection 'none'" for res in results)


def _ckks_refusals(pki, s: ServerSettings, cids, keyholder):
    """Run a ckks round; return the server's reports, the clients' and why each client refused."""
    from secagg.ckks.mode import CkksClientRound

    refusals: dict[int, str] = {}

    def watch(mode, ctx, params):
        try:
            return CkksClientRound(ctx, params)  # a refusal raises here, before any key exists
        except Exception as exc:
            refusals[ctx.client_id] = f"{type(exc).__name__}: {exc}"
            raise

    async def clients(port):
        return await asyncio.gather(*honest(pki, port, cids, keyholder=keyholder, make_round=watch))

    reports, results = asyncio.run(with_server(pki, s, clients))
    return reports, results, refusals


@pytest.mark.parametrize("named", [3, 2])
def test_a_server_naming_another_key_holder_is_refused_by_every_client(pki, named):
    """Clients trust client 1 (CA key-holder role, their own config); the server names another."""
    pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    s = settings(protection="ckks", options={"dim": DIM, "clip": 10.0, "keyholder": named}, expected_clients=4,
                 threshold=3, stage_timeout=3.0)
    reports, results, refusals = _ckks_refusals(pki, s, (1, 2, 3, 4), keyholder=1)
    assert not reports[0].ok and reports[0].outcome is None
    assert sorted(refusals) == [1, 2, 3, 4]  # every client, the named one included, refused
    for why in refusals.values():
        assert why.startswith("MaliciousServerDetected") and f"names client {named}" in why
    assert all(res.rounds.get(0) is None for res in results)  # nothing released


def test_every_client_refuses_a_ckks_round_whose_key_holder_would_decrypt_a_sum_below_its_policy(pki):
    """threshold 2: the key holder would decrypt a sum of 2 updates; the clients' policy asks for 3."""
    pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    s = settings(protection="ckks", options={"dim": DIM, "clip": 10.0}, expected_clients=4, threshold=2, stage_timeout=3.0)
    reports, results, refusals = _ckks_refusals(pki, s, (1, 2, 3, 4), keyholder=1)
    assert not reports[0].ok
    assert sorted(refusals) == [1, 2, 3, 4]  # the key holder included: it never decrypts the small sum
    assert all(why.startswith("MaliciousServerDetected") and "min_participants" in why for why in refusals.values())
    assert all(res.rounds.get(0) is None for res in results)


def test_a_client_whose_certificate_lacks_the_key_holder_role_is_never_a_key_holder(pki):
    """Even if every client's config names client 3, its certificate was not issued as a key holder."""
    pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    s = settings(protection="ckks", options={"dim": DIM, "clip": 10.0, "keyholder": 3}, expected_clients=3,
                 threshold=2, stage_timeout=3.0)
    reports, _, refusals = _ckks_refusals(pki, s, (1, 2, 3), keyholder=3)
    assert not reports[0].ok
    assert sorted(refusals) == [1, 2, 3]
    assert all("key-holder role" in why for why in refusals.values())


def test_a_client_that_trusts_no_key_holder_refuses_ckks_rounds(pki):
    pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    s = settings(protection="ckks", options={"dim": DIM, "clip": 10.0}, expected_clients=2, threshold=2, stage_timeout=3.0)
    reports, _, refusals = _ckks_refusals(pki, s, (1, 2), keyholder=None)
    assert not reports[0].ok
    assert sorted(refusals) == [1, 2]
    assert all("trusts no key holder" in why for why in refusals.values())


@pytest.mark.parametrize(("scheme", "forward"), [("ckks", {}), ("bfv", {}), ("ckks", {"forward_bytes": 1})])
def test_ckks_in_process_and_grpc_give_bit_identical_totals(pki, scheme, forward):
    """One round of the same sessions, driven in process and over gRPC: the same released sum, bit for bit.

    The encryption randomness differs between the two runs (it is secret and never fixed);
    the totals still agree exactly. BFV is exact arithmetic on the quantized updates. For
    CKKS the inputs are multiples of 2^-10, so their sum lies on the 2^-22 release grid and
    the key holder's rounding removes the decryption noise: the noise would have to exceed
    2^-23 (about 50 of its standard deviations here), a false-failure rate far below 1e-9.
    With ``forward_bytes`` 1 the server forwards the uploads one per message (four decrypt stages).
    """
    pytest.importorskip("tenseal", reason="the ckks mode needs TenSEAL (extra: he)")
    import secagg

    cids, bound = (1, 2, 3, 4), 2.0
    rng = np.random.default_rng(7)  # public test inputs, not secrets
    rows = np.rint(rng.uniform(-bound, bound, (len(cids), DIM)) * 1024) / 1024
    updates = dict(zip(cids, rows))

    async def clients(port):
        cs = ClientSettings(server=f"localhost:{port}", keyholder=1)
        return await asyncio.gather(*[run_client(cs, creds(pki, c), lambda r, c=c: updates[c]) for c in cids])

    s = settings(protection="ckks", options={"dim": DIM, "clip": bound, "scheme": scheme, **forward}, expected_clients=4,
                 threshold=3)
    reports, _ = asyncio.run(with_server(pki, s, clients))
    assert reports[0].ok and reports[0].outcome.included == cids
    local = secagg.aggregate(rows, protection="ckks", scheme=scheme, value_bound=bound, min_clients=3)
    assert local.included == (0, 1, 2, 3)
    assert reports[0].outcome.total.tobytes() == np.asarray(local.total, dtype="<f8").tobytes()
    assert np.max(np.abs(local.total - rows.sum(0))) <= local.max_quantization_error


def test_masking_in_process_and_grpc_give_bit_identical_totals(pki):
    """One masking round driven in process and over gRPC: the same released sum, bit for bit.

    Keys, masks and the rounding stream are fresh in each run (they are secret and never
    fixed). The inputs are multiples of 2^-10 and the fixed-point scale is 2^20, so every
    input is an exact fixed-point value: stochastic rounding has nothing to round, the masks
    cancel exactly mod 2^32, and both runs decode the same integer sum -- deterministically,
    so this test cannot fail by chance.
    """
    import secagg

    cids, bound, scale = (1, 2, 3, 4), 2.0, 2.0**20
    rng = np.random.default_rng(11)  # public test inputs, not secrets
    rows = np.rint(rng.uniform(-bound, bound, (len(cids), DIM)) * 1024) / 1024
    updates = dict(zip(cids, rows))

    async def clients(port):
        cs = ClientSettings(server=f"localhost:{port}")
        return await asyncio.gather(*[run_client(cs, creds(pki, c), lambda r, c=c: updates[c]) for c in cids])

    options = {"dim": DIM, "clip": bound, "clip_mode": "coordinate", "scale": scale}
    reports, _ = asyncio.run(with_server(pki, settings(options=options, expected_clients=4, threshold=3), clients))
    assert reports[0].ok and reports[0].outcome.included == cids
    local = secagg.aggregate(rows, clip=bound, clip_mode="coordinate", scale=scale)
    assert local.included == (0, 1, 2, 3)
    assert reports[0].outcome.total.tobytes() == np.asarray(local.total, dtype="<f8").tobytes()
    np.testing.assert_array_equal(local.total, rows.sum(0))  # exact: every value is on the grid
    # one outcome shape on both links: bytes sent per parameter over the whole round, stages dropped at
    assert reports[0].outcome.bytes_up_per_param == pytest.approx(local.bytes_up_per_param, rel=0.05)
    assert reports[0].outcome.dropped == local.dropped == {}
