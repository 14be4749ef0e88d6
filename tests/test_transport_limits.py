"""Deployment limits of the gRPC server, attacked by real clients over mutual TLS on loopback.

Each attacker holds a valid client certificate (the TLS layer lets it in); what it sends
after its hello must not cost the server memory it did not agree to hold.
"""

from __future__ import annotations

import asyncio
import logging
import re

import grpc
import pytest

from federation.transport import frames
from federation.transport.certs import Credentials
from federation.transport.frames import Chunk, Hello
from federation.transport.grpc_client import ClientSettings, channel_options
from federation.transport.grpc_server import AggregationServer
from secagg import wire
from tests.test_transport_grpc import await_stage_request, creds, honest, settings

BIG = frames.MAX_CHUNK_BYTES  # 4 MiB of payload per chunk, the largest a chunk may carry


async def _attacker(pki, port: int, cid: int, act) -> str:
    """Connect as client ``cid``, send a hello, run ``act(call)``, read until the server ends the stream."""
    c = creds(pki, cid)
    ch_creds = grpc.ssl_channel_credentials(root_certificates=c.ca_pem, private_key=c.key_pem, certificate_chain=c.cert_pem)
    async with grpc.aio.secure_channel(f"localhost:{port}", ch_creds, options=channel_options(ClientSettings())) as ch:
        call = ch.stream_stream(frames.METHOD)()
        await call.write(wire.seal(Hello(client_id=cid, software="t"), cid, c.identity))
        try:
            await act(call)
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        except asyncio.InvalidStateError:
            # The server ended the stream while the attacker was still writing (e.g. it was
            # disconnected for its frame rate): the call is over, report how it ended.
            return (await call.code()).name
        return "EOF"


def _chunks(seq: int, count: int, size: int, send: int | None = None) -> list[bytes]:
    data = b"\x5a" * size
    return [wire.encode(Chunk(seq=seq, index=i, count=count, data=data)) for i in range(send or count)]


async def _started(pki, s) -> AggregationServer:
    server = AggregationServer(s, Credentials.load(pki / "ca" / "server"))
    await server.start()
    return server


def test_unsolicited_message_is_never_buffered(pki, caplog):
    """No round is running: a 32 MiB chunked message is read and discarded, never held."""
    caplog.set_level(logging.INFO, logger="secagg.server")

    async def scenario():
        server = await _started(pki, settings(expected_clients=5, join_timeout=60.0))
        try:
            async def act(call):
                for f in _chunks(1, 8, BIG):  # one whole 32 MiB payload nobody asked for
                    await call.write(f)
                for seq in range(2, 10):  # then eight small ones: the ninth unsolicited message is a flood
                    for f in _chunks(seq, 1, 100):
                        await call.write(f)

            end = await asyncio.wait_for(_attacker(pki, server.port, 1, act), 60)
            return server, end
        finally:
            await server.stop(0)

    server, end = asyncio.run(scenario())
    assert end in ("EOF", "CANCELLED", "UNAVAILABLE")  # the server closed the stream
    assert server.peak_buffered_bytes == 0 and server.buffered_bytes == 0
    assert "discarding an unsolicited 8-chunk message: no round is running" in caplog.text
    assert "flooding: 9 messages the protocol did not ask for" in caplog.text
    assert re.search(r"client 1 \(ipv[46]:\S+\): discarding", caplog.text)  # the log names the peer


def test_awaited_client_cannot_declare_more_than_its_stage_limit(pki, caplog):
    """In a round, a client the stage awaits is refused at the first chunk of an oversized message."""
    caplog.set_level(logging.INFO, logger="secagg.server")

    async def big_count(call):
        await await_stage_request(call)  # the advertise stage accepts at most 64 KiB + 1 KiB per client
        for f in _chunks(1, 60, BIG, send=1):
            await call.write(f)

    async def big_chunk(call):
        await await_stage_request(call)
        for f in _chunks(1, 2, BIG, send=1):  # two chunks could fit, but the first is already too big
            await call.write(f)

    async def scenario():
        # six clients, two attacking: the masking plan's t = 4 (up to one colluder assumed) still holds
        server = await _started(pki, settings(expected_clients=6, threshold=3, stage_timeout=10.0))
        try:
            serving = asyncio.ensure_future(server.serve())
            await asyncio.wait_for(asyncio.gather(
                *honest(pki, server.port, (1, 2, 3, 6)),
                _attacker(pki, server.port, 4, big_count), _attacker(pki, server.port, 5, big_chunk),
            ), 60)
            reports = await asyncio.wait_for(serving, 60)
            return server, reports
        finally:
            await server.stop(0)

    server, (report,) = asyncio.run(scenario())
    assert report.ok and report.outcome.included == (1, 2, 3, 6)
    limit = (64 << 10) + 6 * (1 << 10)
    assert f"a payload of 60 chunks is larger than the {limit}-byte limit of this stage" in report.dropped[4]
    assert f"exceeds the {limit}-byte limit of this stage" in report.dropped[5]
    assert server.peak_buffered_bytes == 0  # neither attacker had a byte held


def test_rate_limit_applies_to_discarded_chunks(pki, caplog):
    """Discarded chunks still count against the per-client frame rate."""
    caplog.set_level(logging.INFO, logger="secagg.server")

    async def scenario():
        server = await _started(pki, settings(expected_clients=5, join_timeout=60.0,
                                              frames_per_second=20.0, frame_burst=40.0))
        try:
            async def act(call):
                for f in _chunks(1, 60, frames.MIN_CHUNK_BYTES):
                    await call.write(f)

            return await asyncio.wait_for(_attacker(pki, server.port, 1, act), 60)
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    assert re.search(r"client 1 \(ipv[46]:\S+\) disconnected by the server: rate limit: more than 20 frames/s",
                     caplog.text)


@pytest.mark.parametrize("count", [2, 60])
def test_reassembler_asks_before_keeping(count):
    """Unit: ``admit`` sees the first chunk before any byte is kept; None discards the payload."""
    r = frames.Reassembler(max_message_bytes=1 << 30)
    seen = []
    chunks = [wire.decode(f, max_bytes=BIG + frames.FRAME_OVERHEAD) for f in _chunks(1, count, frames.MIN_CHUNK_BYTES)]
    out = None
    for ch in chunks:
        out = r.feed(ch, admit=lambda first: seen.append((first.index, r.buffered)))
        assert r.buffered == 0
    assert out is None and seen == [(0, 0)]


def test_idle_unauthenticated_connections_are_capped_and_closed(pki):
    """Raw TCP connections that never start TLS: beyond the cap closed at once, the rest after the handshake timeout."""
    import socket

    import numpy as np

    from federation.transport.grpc_client import run_client

    def states(socks) -> list[str]:
        out = []
        for s in socks:
            try:
                out.append("closed" if s.recv(16) == b"" else "data")
            except TimeoutError:
                out.append("open")
            except OSError:
                out.append("closed")
        return out

    async def scenario():
        # three clients: a masking round of fewer is refused by every client's policy
        s = settings(expected_clients=3, threshold=2, max_connections=5, handshake_timeout=1.0,
                     options={"dim": 4, "clip": 1.0})
        server = await _started(pki, s)
        socks = []
        try:
            for _ in range(8):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.settimeout(0.01)
                socks.append(sock)
            await asyncio.sleep(0.3)
            early = states(socks)
            for _ in range(300):  # the handshake timeout is 1 s; allow a loaded machine 15 s
                await asyncio.sleep(0.05)
                if states(socks) == ["closed"] * 8:
                    break
            late = states(socks)
            # legitimate clients still get in
            clients = [asyncio.ensure_future(run_client(ClientSettings(server=f"localhost:{server.port}"),
                                                        creds(pki, c), lambda r: np.zeros(4, np.float32)))
                       for c in (1, 2, 3)]
            reports = await asyncio.wait_for(server.serve(), 30)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
            return early, late, reports
        finally:
            for sock in socks:
                sock.close()
            await server.stop(0)

    early, late, (report,) = asyncio.run(scenario())
    assert early.count("closed") == 3 and early.count("open") == 5  # three over the cap of five
    assert late == ["closed"] * 8  # none finished a handshake within handshake_timeout
    assert report.ok and report.participants == (1, 2, 3)


@pytest.mark.slow
def test_server_process_memory_stays_flat_under_unsolicited_256_mib_messages(pki, tmp_path):
    """The issue's reproduction: 4 clients each stream a 256 MiB chunked message with no round
    running. Before admission at the first chunk the server held them all (1.7-2.2 GiB peak).
    Now it holds none of them, only the frames in flight on each connection (a few 4 MiB
    frames and their decoded copies: +112 MiB measured for the four), so its peak must stay
    below the size of a single one of the payloads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'[server]\ncredentials = "{pki / "ca" / "server"}"\nexpected_clients = 8\njoin_timeout = 600\n'
                   'rounds = 1\nthreshold = 2\n[server.options]\ndim = 16\nclip = 1.0\n')
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(repo))
    server = subprocess.Popen([sys.executable, "-m", "secagg", "serve", "--config", str(cfg), "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)

    def hwm() -> int:
        for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
        raise AssertionError("no VmHWM")

    async def flood(cid: int) -> str:
        async def act(call):
            data = b"\x5a" * BIG
            for i in range(64):  # 64 x 4 MiB = 256 MiB, the default max_message_bytes
                await call.write(wire.encode(Chunk(seq=1, index=i, count=64, data=data)))
            await call.done_writing()  # the server reads every chunk, then sees the stream end
        return await _attacker(pki, port, cid, act)

    try:
        for _ in range(600):
            if "listening on" in (line := server.stderr.readline()):
                break
        assert "listening on" in line, line
        before = hwm()

        async def all_floods():
            tasks = [asyncio.ensure_future(flood(c)) for c in (1, 2, 3, 4)]
            await asyncio.sleep(0)
            done, pending = await asyncio.wait(tasks, timeout=240)
            for t in pending:
                t.cancel()
            return len(done)

        asyncio.run(all_floods())
        after = hwm()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert after - before < 256 << 20, f"server peak RSS grew by {(after - before) >> 20} MiB"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_cap_stays_within_the_open_file_limit(monkeypatch, caplog):
    import resource

    from federation.transport.grpc_server import connection_cap

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    with caplog.at_level(logging.WARNING, logger="secagg.server"):
        assert connection_cap(4096) == 1024 - 64
        assert connection_cap(500) == 500
    assert "max_connections 4096 lowered to 960: the open-file limit (ulimit -n) is 1024" in caplog.text
