"""Revocation over real mutual TLS on loopback: `secagg certs revoke`, re-issue with --force.

A retired certificate must stop working without a new CA, and must not lock the new
holder of the id out while it still holds a connection.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time

import grpc
import numpy as np
import pytest

from federation.transport import frames
from federation.transport.certs import Credentials, init_ca, issue
from federation.transport.frames import Hello
from federation.transport.grpc_client import ClientSettings, channel_options, run_client
from federation.transport.grpc_server import AggregationServer, ServerSettings
from federation.transport.revocation import RevocationList, revoke
from secagg import wire
from secagg.cli import main
from secagg.errors import ConfigError

DIM = 16


@pytest.fixture
def ca(tmp_path, make_pki):
    return make_pki(tmp_path / "certs", (1, 2, 3, 4))  # its own: the tests revoke and re-issue


def _settings(ca, **kw) -> ServerSettings:
    base = dict(protection="masking", options={"dim": DIM, "clip": 10.0}, expected_clients=3, threshold=2,
                join_timeout=20.0, stage_timeout=10.0, rounds=1, crl=str(ca / "server" / "crl.pem"))
    base.update(kw)
    return ServerSettings(**base)


def _vec(cid: int, rnd: int) -> np.ndarray:
    return np.full(DIM, float(cid), dtype=np.float32)


def _client(port: int, creds: Credentials):
    return run_client(ClientSettings(server=f"localhost:{port}"), creds, lambda r, c=creds: _vec(1, r))


class _Holder:
    """A client that says hello and then only reads, until the server ends its stream."""

    def __init__(self, port: int, creds: Credentials) -> None:
        self.ended = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run(port, creds))

    async def _run(self, port, c: Credentials) -> None:
        ch_creds = grpc.ssl_channel_credentials(root_certificates=c.ca_pem, private_key=c.key_pem,
                                                certificate_chain=c.cert_pem)
        cid = c.check_binding().client_id
        async with grpc.aio.secure_channel(f"localhost:{port}", ch_creds,
                                           options=channel_options(ClientSettings())) as ch:
            call = ch.stream_stream(frames.METHOD)()
            await call.write(wire.seal(Hello(client_id=cid, software="t"), cid, c.identity))
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
                self.ended.set_result("EOF")
            except grpc.aio.AioRpcError as exc:
                self.ended.set_result(exc.code().name)


async def _connected(server: AggregationServer, cid: int, serial: int | None = None) -> None:
    for _ in range(400):
        conn = server._conns.get(cid)
        if conn is not None and not conn.closed and (serial is None or conn.serial == serial):
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"client {cid} never connected")


def _serial(path) -> int:
    from federation.transport.revocation import certificate_serial

    return certificate_serial(path.read_bytes())


def test_revoked_certificate_is_refused_and_a_connected_holder_dropped(ca, caplog):
    caplog.set_level(logging.INFO, logger="secagg.server")

    async def scenario():
        server = AggregationServer(_settings(ca), Credentials.load(ca / "server"))
        port = await server.start()
        try:
            holder = _Holder(port, Credentials.load(ca / "client-4"))
            await _connected(server, 4)
            assert main(["certs", "revoke", "4", "--dir", str(ca)]) == 0  # server keeps running
            again = await asyncio.wait_for(_client(port, Credentials.load(ca / "client-4")), 30)
            ended = await asyncio.wait_for(holder.ended, 10)  # dropped when the new list was read
            serving = asyncio.ensure_future(server.serve())
            results = await asyncio.wait_for(asyncio.gather(
                *(_client(port, Credentials.load(ca / f"client-{c}")) for c in (1, 2, 3))), 60)
            return again, ended, await serving, results
        finally:
            await server.stop(0)

    again, ended, (report,), _ = asyncio.run(scenario())
    assert again.lost.startswith("PERMISSION_DENIED") and "revoked" in again.lost
    assert ended in ("EOF", "CANCELLED", "UNAVAILABLE")
    assert report.ok and report.participants == (1, 2, 3)
    assert "refused client 4 (ipv" in caplog.text and "its certificate is revoked" in caplog.text
    assert "was revoked" in caplog.text


def test_reissue_with_force_retires_the_old_certificate_and_lets_the_new_holder_in(ca, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secagg.server")
    shutil.copytree(ca / "client-2", tmp_path / "old-2")

    async def scenario():
        server = AggregationServer(_settings(ca), Credentials.load(ca / "server"))
        port = await server.start()
        try:
            old = _Holder(port, Credentials.load(tmp_path / "old-2"))
            await _connected(server, 2)
            assert main(["certs", "issue", "2", "--force", "--dir", str(ca)]) == 0
            serving = asyncio.ensure_future(server.serve())
            results = await asyncio.wait_for(asyncio.gather(
                *(_client(port, Credentials.load(ca / f"client-{c}")) for c in (1, 2, 3))), 60)
            ended = await asyncio.wait_for(old.ended, 10)
            back = await asyncio.wait_for(_client(port, Credentials.load(tmp_path / "old-2")), 30)
            return await serving, results, ended, back
        finally:
            await server.stop(0)

    (report,), results, ended, back = asyncio.run(scenario())
    assert report.ok and report.participants == (1, 2, 3)  # the new holder of id 2 took part
    assert results[1].included[0] == (1, 2, 3)
    assert ended in ("EOF", "CANCELLED", "UNAVAILABLE")
    assert back.lost.startswith("PERMISSION_DENIED")  # the old certificate stays refused


def test_without_a_revocation_list_a_newer_certificate_still_displaces_the_old(ca, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secagg.server")
    shutil.copytree(ca / "client-2", tmp_path / "old-2")
    time.sleep(1.1)  # certificate validity starts are whole seconds: make the new one strictly newer
    issue(ca, client_id=2, force=True)
    (ca / "crl.pem").unlink()
    (ca / "server" / "crl.pem").unlink()

    async def scenario():
        server = AggregationServer(_settings(ca, crl=None, rounds=1), Credentials.load(ca / "server"))
        port = await server.start()
        try:
            old = _Holder(port, Credentials.load(tmp_path / "old-2"))
            await _connected(server, 2)
            new = _Holder(port, Credentials.load(ca / "client-2"))
            ended = await asyncio.wait_for(old.ended, 10)
            await _connected(server, 2, _serial(ca / "client-2" / "tls.pem"))
            older = await asyncio.wait_for(_client(port, Credentials.load(tmp_path / "old-2")), 30)
            new.task.cancel()
            return ended, older
        finally:
            await server.stop(0)

    ended, older = asyncio.run(scenario())
    assert ended in ("EOF", "CANCELLED", "UNAVAILABLE")
    assert "replaced: a newer certificate" in caplog.text
    assert older.lost.startswith("ALREADY_EXISTS")  # an older certificate cannot push the newer one out


def test_revocation_list_must_be_signed_by_the_deployment_ca(ca, tmp_path):
    other = tmp_path / "other"
    init_ca(other)
    issue(other, client_id=1)
    revoke(other, (other / "client-1" / "tls.pem").read_bytes())
    with pytest.raises(ConfigError, match="not signed by this deployment's CA"):
        RevocationList(other / "crl.pem", (ca / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="not issued by the CA"):
        revoke(ca, (other / "client-1" / "tls.pem").read_bytes())
    revoke(ca, (ca / "client-1" / "tls.pem").read_bytes())
    revoke(ca, (ca / "client-1" / "tls.pem").read_bytes())  # idempotent
    listed = RevocationList(ca / "server" / "crl.pem", (ca / "ca.pem").read_bytes())
    assert listed.serials == {_serial(ca / "client-1" / "tls.pem")}
