"""Stalled clients over real mutual TLS on loopback.

A client that stops answering (a process stopped with SIGSTOP, a hung host) must cost at
most one stage timeout: it is disconnected when it misses a stage and is not picked for
later rounds unless it reconnects; a peer that no longer answers keepalive pings is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest

from federation.transport import frames
from federation.transport.certs import Credentials
from federation.transport.frames import Hello
from federation.transport.grpc_client import ClientSettings, channel_options
from federation.transport.grpc_server import AggregationServer
from secagg import wire
from tests.test_transport_grpc import creds, honest, settings


async def _silent(pki, port: int, cid: int, done: asyncio.Event) -> str:
    """Say hello, then neither read nor write (a stopped process) until ``done``; report how the stream ended."""
    c = creds(pki, cid)
    ch_creds = grpc.ssl_channel_credentials(root_certificates=c.ca_pem, private_key=c.key_pem, certificate_chain=c.cert_pem)
    async with grpc.aio.secure_channel(f"localhost:{port}", ch_creds, options=channel_options(ClientSettings())) as ch:
        call = ch.stream_stream(frames.METHOD)()
        await call.write(wire.seal(Hello(client_id=cid, software="t"), cid, c.identity))
        await done.wait()
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "EOF"


def test_client_that_misses_a_stage_is_disconnected_and_not_picked_again(pki, caplog):
    caplog.set_level(logging.INFO, logger="secagg.server")

    async def scenario():
        s = settings(expected_clients=4, threshold=3, rounds=3, stage_timeout=2.0, rejoin_timeout=0.5)
        server = AggregationServer(s, Credentials.load(pki / "ca" / "server"))
        port = await server.start()
        try:
            done = asyncio.Event()
            silent = asyncio.ensure_future(_silent(pki, port, 4, done))
            serving = asyncio.ensure_future(server.serve())
            await asyncio.wait_for(asyncio.gather(*honest(pki, port, (1, 2, 3))), 60)
            reports = await asyncio.wait_for(serving, 60)
            done.set()
            return reports, await asyncio.wait_for(silent, 10)
        finally:
            await server.stop(0)

    reports, ended = asyncio.run(scenario())
    r0, r1, r2 = reports
    assert all(r.ok for r in reports)
    assert r0.participants == (1, 2, 3, 4) and "no reply in stage 'advertise'" in r0.dropped[4]
    assert "disconnected" in r0.dropped[4]
    assert r1.participants == r2.participants == (1, 2, 3)  # never picked again: no more stage timeouts
    assert not r1.dropped and not r2.dropped
    assert ended in ("EOF", "CANCELLED")  # its stream was closed by the server


HOLDER = textwrap.dedent('''
    import asyncio, sys, grpc
    from federation.transport import frames
    from federation.transport.certs import Credentials
    from federation.transport.frames import Hello
    from federation.transport.grpc_client import ClientSettings, channel_options
    from secagg import wire

    async def main(port, d):
        c = Credentials.load(d)
        cid = c.check_binding().client_id
        cr = grpc.ssl_channel_credentials(root_certificates=c.ca_pem, private_key=c.key_pem,
                                          certificate_chain=c.cert_pem)
        async with grpc.aio.secure_channel(f"localhost:{port}", cr, options=channel_options(ClientSettings())) as ch:
            call = ch.stream_stream(frames.METHOD)()
            await call.write(wire.seal(Hello(client_id=cid, software="t"), cid, c.identity))
            print("connected", flush=True)
            while await call.read() is not grpc.aio.EOF:
                pass

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
''')


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_keepalive_closes_a_stopped_process(pki, tmp_path, caplog):
    """A client process stopped with SIGSTOP holds its TCP connection open; keepalive closes it."""
    caplog.set_level(logging.INFO, logger="secagg.server")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)

    async def scenario():
        s = settings(expected_clients=4, keepalive_seconds=1.0, keepalive_timeout=1.0)
        server = AggregationServer(s, Credentials.load(pki / "ca" / "server"))
        port = await server.start()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(pki / "ca" / "client-5")],
                                stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"connected"
            for _ in range(200):
                if 5 in server._conns:
                    break
                await asyncio.sleep(0.05)
            assert 5 in server._conns
            os.kill(proc.pid, signal.SIGSTOP)
            for _ in range(600):  # keepalive 1 s + timeout 1 s; allow a loaded machine 30 s
                if 5 not in server._conns:
                    return True
                await asyncio.sleep(0.05)
            return False
        finally:
            proc.kill()
            proc.wait()
            await server.stop(0)

    assert asyncio.run(scenario()), "the stopped client's connection was never closed"
    assert re.search(r"client 5 \(ipv[46]:\S+\) disconnected by the server: disconnected \(.*keepalive", caplog.text)


class _StopsAfter:
    """Answers the first ``n`` server messages, then never again."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls = inner, n, 0

    def receive(self, payload):
        self.calls += 1
        return self.inner.receive(payload) if self.calls <= self.n else None

    done = False


def test_round_log_never_lists_an_included_client_as_dropped(pki, tmp_path):
    """A client that stops after its masked input is in the sum; the round log must not call it dropped."""
    import json

    from federation.transport.grpc_client import run_client
    from federation.transport.grpc_server import serve_resumable_rounds
    from secagg.protocol.mode import MaskingClientRound
    from tests.test_transport_grpc import update

    lines = []

    async def scenario():
        s = settings(expected_clients=4, threshold=3, rounds=1, stage_timeout=2.0)
        port_ready = asyncio.get_running_loop().create_future()
        serving = asyncio.ensure_future(serve_resumable_rounds(
            s, Credentials.load(pki / "ca" / "server"), tmp_path / "state", print_line=lines.append,
            ready=port_ready.set_result))
        port = await port_ready
        cs = ClientSettings(server=f"localhost:{port}")
        late = run_client(cs, creds(pki, 4), lambda r: update(4, r),
                          make_round=lambda mode, ctx, params: _StopsAfter(MaskingClientRound(ctx, params), 3))
        await asyncio.wait_for(asyncio.gather(late, *honest(pki, port, (1, 2, 3))), 60)
        return await asyncio.wait_for(serving, 60)

    assert asyncio.run(scenario())
    (line,) = lines
    assert line["ok"] and line["included"] == [1, 2, 3, 4] and line["stage_timeout"] == 2.0
    assert line["bytes_up_per_param"] >= 4.0  # the masked input alone is 4 bytes a parameter
    assert "4" not in line["dropped"]  # its input is in the sum
    assert json.loads((tmp_path / "state" / "rounds.jsonl").read_text()) == line


def test_failed_rounds_are_recorded_with_their_reason(pki, tmp_path):
    from federation.transport.grpc_server import serve_resumable_rounds

    s = settings(expected_clients=2, threshold=2, rounds=1, join_timeout=0.5)
    ok = asyncio.run(serve_resumable_rounds(s, Credentials.load(pki / "ca" / "server"), tmp_path / "state"))
    assert not ok
    import json

    (line,) = [json.loads(x) for x in (tmp_path / "state" / "rounds.jsonl").read_text().splitlines()]
    assert line["ok"] is False and "only 0 clients connected, the threshold is 2" in line["reason"]
    assert not (tmp_path / "state" / "progress.json").exists()
