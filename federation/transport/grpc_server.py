"""gRPC aggregation server with mutual TLS (asyncio).

Theory of operation
-------------------
One bidirectional stream per client (``/secagg.v1.Aggregation/Session``; a generic
handler with bytes in and out, so no protoc step). Every gRPC message on it is one
``transport.*`` frame (:mod:`federation.transport.frames`).

1. TLS: the server only listens on a secure port created with
   ``require_client_auth=True`` and the deployment's CA as the only root, so a client
   without a certificate, or with one from another CA, fails the handshake and never
   reaches this code. There is no plaintext port.
2. Identity: the client certificate names the client id and its Ed25519 protocol key
   (:mod:`federation.transport.certs`). The first frame must be a :class:`Hello` sealed
   by that key and naming that id; every protocol payload must be sealed the same way.
   Anything else is an identity mismatch and the stream is closed.
3. Rounds: the coordinator waits for clients, builds the round's :class:`ServerRound`
   (a sans-IO protocol session, :mod:`secagg.rounds`), sends each participant
   ``RoundStart`` and the round's parameters, and runs the round with the one driver,
   :func:`secagg.rounds.drive`, in a worker thread. This server is only its link
   (:class:`GrpcLink`): it moves each stage's bytes, hands replies to the driver as they
   arrive and ends a stage when every awaited client answered or ``stage_timeout``
   passed. A client that did not answer in time, disconnected, or sent something the
   protocol refused is a dropout of that round; the reason is logged (logger
   ``secagg.server``). The round completes when the protocol can still finish (at least
   ``threshold`` survivors), else it is reported as failed.
4. Abuse: frames are capped by ``grpc.max_receive_message_length``; payloads by
   ``max_message_bytes`` (chunks reassembled in order); each stream has a token-bucket
   frame rate limit and a cap on messages outside the current stage; one stream per
   client id; at most ``max_connections`` streams. A violating client is dropped and its
   stream closed; the server and the round go on.

The event loop owns every connection and never runs protocol work; the driver thread
owns the round's session and never touches a connection. They meet in :class:`GrpcLink`: a
thread-safe queue of replies one way, ``call_soon_threadsafe`` sends and drops the other,
and the :class:`~secagg.rounds.StageView` the driver keeps current (who the stage awaits,
its message size limit), which the loop reads to refuse unsolicited messages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import grpc
import numpy as np
from cryptography import x509

from federation.transport import frames
from federation.transport.certs import Credentials, identity_from_pem
from federation.transport.frames import (
    Bye,
    Chunk,
    Dropped,
    Hello,
    Reassembler,
    RoundEnd,
    RoundStart,
    TokenBucket,
)
from federation.transport.revocation import RevocationList
from federation.transport.state import read_progress, record_failed_round, record_round
from secagg import wire
from secagg.errors import ConfigError, InvalidSignature, SecAggError, WireError
from secagg.protocol.mode import payload_limit
from secagg.rounds import Reply, RoundContext, RoundOutcome, StageView, drive, get_mode

log = logging.getLogger("secagg.server")
CLOSE_GRACE = 2.0  # seconds a closed stream gets to flush its last frames before it is cancelled


@dataclass
class ServerSettings:
    """Knobs of one server; ``secagg serve`` reads them from the ``[server]`` table of a TOML file."""

    host: str = "127.0.0.1"
    port: int = 0
    protection: str = "masking"  # which protection its rounds run (the name of a core Mode)
    options: dict = field(default_factory=dict)
    rounds: int = 1
    expected_clients: int = 2  # start a round as soon as this many are connected
    threshold: int = 2  # minimum survivors for a round to complete
    join_timeout: float = 60.0  # first round: how long to wait for expected_clients
    rejoin_timeout: float = 2.0  # later rounds: how long to wait for missing clients to come back
    stage_timeout: float = 30.0  # per protocol stage; non-responders become dropouts
    hello_timeout: float = 10.0  # after the TLS handshake: the signed hello must arrive within this
    handshake_timeout: float = 10.0  # a connection that has not finished the TLS handshake is closed
    keepalive_seconds: float = 20.0  # ping every connection this often...
    keepalive_timeout: float = 10.0  # ...and close it when the ping is not answered within this
    chunk_bytes: int = frames.DEFAULT_CHUNK_BYTES
    max_message_bytes: int = 256 << 20
    # incomplete payloads of all clients together; a client whose payload does not fit waits (unread)
    max_inflight_bytes: int = 1 << 30
    frames_per_second: float = 2000.0
    frame_burst: float = 4000.0
    max_unexpected_messages: int = 8  # per client per round, outside what the stage awaits
    max_connections: int = 4096
    crl: str | None = None  # revocation list (PEM CRL); `secagg serve` defaults it to <credentials>/crl.pem
    share_result: bool = True  # send the released aggregate back to the participants
    first_round: int = 0

    def check(self) -> None:
        if not (1 <= self.threshold <= self.expected_clients):
            raise ConfigError(
                f"threshold must be between 1 and expected_clients ({self.expected_clients}), got {self.threshold}"
            )
        if min(self.stage_timeout, self.join_timeout, self.hello_timeout, self.handshake_timeout,
               self.keepalive_seconds, self.keepalive_timeout) <= 0:
            raise ConfigError("stage_timeout, join_timeout, hello_timeout, handshake_timeout, keepalive_seconds "
                              "and keepalive_timeout must be positive seconds")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.max_inflight_bytes < 1:
            raise ConfigError("max_inflight_bytes must be a positive number of bytes (e.g. 1073741824 for 1 GiB)")
        if not frames.MIN_CHUNK_BYTES <= self.chunk_bytes <= frames.MAX_CHUNK_BYTES:
            raise ConfigError(
                f"chunk_bytes must be between {frames.MIN_CHUNK_BYTES} and {frames.MAX_CHUNK_BYTES}"
            )


class _Kick(Exception):
    """Internal: close this client's stream for the given reason."""


class _Conn:
    def __init__(self, cid: int, key: bytes, cert_pem: bytes, settings: ServerSettings, peer: str) -> None:
        self.cid, self.key, self.cert_pem, self.peer = cid, key, cert_pem, peer
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.serial, self.issued = cert.serial_number, cert.not_valid_before_utc
        self.out: asyncio.Queue[bytes | Iterator[bytes] | None] = asyncio.Queue()  # a payload: its frames, lazily
        self.seq = 0
        self.bucket = TokenBucket(settings.frames_per_second, settings.frame_burst)
        self.reassembler = Reassembler(settings.max_message_bytes, views=True)  # payloads are parsed in place
        self.unexpected = 0
        self.closed = False
        self.chunk_bytes = settings.chunk_bytes
        self.task: asyncio.Task | None = None  # the stream's handler, cancelled if a close does not flush

    def send_frame(self, data: bytes) -> None:
        if not self.closed:
            self.out.put_nowait(data)

    def send_payload(self, payload: bytes | memoryview) -> None:
        """Queue ``payload``'s frames; each is encoded when written (a payload sent to many
        clients is held once, not once per queue)."""
        self.seq += 1
        if not self.closed:
            self.out.put_nowait(frames.chunk_payload(payload, self.seq, self.chunk_bytes))

    def close(self) -> None:
        """End the stream once the queued frames are written; cancel it if they are not within
        ``CLOSE_GRACE`` seconds (a stopped client that reads nothing must not hold it open)."""
        if not self.closed:
            self.closed = True
            self.out.put_nowait(None)
            if self.task is not None:
                asyncio.get_running_loop().call_later(CLOSE_GRACE, self.task.cancel)


@dataclass
class _RoundState:
    number: int
    active: set[int]
    link: GrpcLink | None = None
    dropped: dict[int, str] = field(default_factory=dict)


class GrpcLink:
    """The :class:`secagg.rounds.Link` of one gRPC round.

    The driver (:func:`secagg.rounds.drive`) calls ``deliver`` / ``replies`` / ``drop`` from
    its worker thread; everything that touches a connection is handed to the event loop
    with ``call_soon_threadsafe``. Streams on the loop hand replies over with :meth:`offer`.
    """

    def __init__(self, server: AggregationServer, state: _RoundState, loop: asyncio.AbstractEventLoop,
                 stage_timeout: float) -> None:
        self._server, self._state, self._loop, self._timeout = server, state, loop, stage_timeout
        # (stage index, reply, release): ``release`` gives back the in-flight budget the payload holds
        self._queue: queue.Queue[tuple[int, Reply, Callable[[], None] | None]] = queue.Queue()
        # loop side: the stage being carried and who already answered it
        self.stage: StageView | None = None
        self.answered: set[int] = set()

    # -- driver thread

    def deliver(self, stage: StageView, outgoing: Mapping[int, bytes]) -> None:
        self._loop.call_soon_threadsafe(self._open, stage, dict(outgoing))

    def replies(self, stage: StageView) -> Iterator[Reply]:
        deadline = time.monotonic() + self._timeout
        while stage.awaiting:
            left = deadline - time.monotonic()
            try:
                index, reply, release = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            try:
                if reply.payload is None or index == stage.index:  # a late reply of an earlier stage is dropped
                    yield reply
            finally:
                del reply  # the driver is done with the payload: free it before its budget is given back
                if release is not None:
                    self._loop.call_soon_threadsafe(release)
        for cid in sorted(stage.awaiting):
            reason = (f"no reply in stage {stage.name!r} within {self._timeout:g}s "
                      "(disconnected; it must reconnect to take part again)")
            self.drop(cid, reason)
            yield Reply(cid, None, reason)

    def drop(self, client: int, reason: str) -> None:
        self._loop.call_soon_threadsafe(partial(self._server._drop, self._state, client, reason, kick=True))

    # -- event loop

    def _open(self, stage: StageView, outgoing: dict[int, bytes]) -> None:
        self.stage, self.answered = stage, set()
        self._server._send(self._state, outgoing)
        log.info("round %d: stage %r, %d clients left", self._state.number, stage.name, len(self._state.active))

    def expects(self, cid: int) -> bool:
        """Whether the stage being carried still waits for a message from ``cid``."""
        stage = self.stage
        return (stage is not None and cid in self._state.active and cid in stage.awaiting
                and cid not in self.answered)

    def offer(self, cid: int, payload: bytes | memoryview, release: Callable[[], None]) -> bool:
        """Hand the driver ``cid``'s reply to the current stage (the first one; later ones are ignored).

        True: the link holds the payload and calls ``release`` (on the loop) once the driver
        is done with it; False: the caller keeps both.
        """
        stage = self.stage
        if stage is None or not self.expects(cid):
            return False
        self.answered.add(cid)
        self._queue.put((stage.index, Reply(cid, payload), release))
        return True

    def lost(self, cid: int, reason: str) -> None:
        """The transport dropped ``cid`` (disconnected, kicked, replaced): tell the driver."""
        self._queue.put((-1, Reply(cid, None, reason), None))

    def close(self) -> None:
        """The round is over: give back the budget of replies the driver never took."""
        while True:
            try:
                _, _, release = self._queue.get_nowait()
            except queue.Empty:
                return
            if release is not None:
                release()


@dataclass
class RoundReport:
    """What the server logs and returns for one round."""

    round: int
    ok: bool
    reason: str
    outcome: RoundOutcome | None
    participants: tuple[int, ...]
    dropped: dict[int, str]
    seconds: float


class AggregationServer:
    """Run ``settings.rounds`` aggregation rounds over gRPC with mutual TLS."""

    def __init__(
        self,
        settings: ServerSettings,
        credentials: Credentials,
        *,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        settings.check()
        self._mode = get_mode(settings.protection)  # fail early on an unknown protection
        self.settings = settings
        self.credentials = credentials
        self.on_round = on_round
        self._revocation = RevocationList(settings.crl, credentials.ca_pem)
        self._conns: dict[int, _Conn] = {}
        self._round: _RoundState | None = None
        self._joined = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.reports: list[RoundReport] = []
        self.buffered_bytes = 0  # payload bytes held for incomplete chunked messages, all clients
        self._inflight = frames.ByteBudget(settings.max_inflight_bytes)
        self.peak_buffered_bytes = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        s = self.settings
        frame_limit = frames.MAX_CHUNK_BYTES + frames.FRAME_OVERHEAD
        cap = connection_cap(s.max_connections)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", frame_limit),
                ("grpc.max_send_message_length", frame_limit),
                ("grpc.max_concurrent_streams", 4),
                # no flow-control window growth by bandwidth probing: gRPC would otherwise buffer
                # megabytes of a stream the server is not reading (its payload waits for the
                # in-flight budget); measured at 4 clients, d = 2^22: 94 -> 58 MB over baseline
                ("grpc.http2.bdp_probe", 0),
                ("grpc.keepalive_time_ms", int(s.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout * 1000)),
                ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout * 1000)),  # else 60 s applies
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                # a TCP connection that has not completed the TLS handshake within this is closed...
                ("grpc.server_handshake_timeout_ms", int(s.handshake_timeout * 1000)),
                # ...and connections beyond the cap are closed as they arrive, so idle sockets
                # cannot exhaust the process's file descriptors
                ("grpc.max_allowed_incoming_connections", cap),
            ],
            maximum_concurrent_rpcs=s.max_connections,
        )
        handler = grpc.method_handlers_generic_handler(
            frames.SERVICE, {"Session": grpc.stream_stream_rpc_method_handler(self._session)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        server_creds = grpc.ssl_server_credentials(
            [(self.credentials.key_pem, self.credentials.cert_pem)],
            root_certificates=self.credentials.ca_pem,
            require_client_auth=True,
        )
        self.port = self._server.add_secure_port(f"{s.host}:{s.port}", server_creds)
        if not self.port:
            raise ConfigError(f"could not listen on {s.host}:{s.port} (address in use or not local)")
        await self._server.start()
        log.info("listening on %s:%d (mutual TLS, protection=%s, at most %d connections, TLS handshake within %gs)",
                 s.host, self.port, s.protection, cap, s.handshake_timeout)
        if s.protection == "none":
            log.warning("protection 'none' is the INSECURE baseline: the server sees every client's update")
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        for conn in list(self._conns.values()):
            conn.send_frame(wire.encode(Bye(reason="server shutting down", final=False)))
            conn.close()
        if self._server is not None:
            await self._server.stop(grace)

    async def serve(self) -> list[RoundReport]:
        """Run every configured round, then say goodbye to the clients."""
        s = self.settings
        for r in range(s.first_round, s.first_round + s.rounds):
            await self.run_one_round(r, first=r == s.first_round)
        await self.finish("all rounds done")
        return self.reports

    async def run_one_round(self, number: int, *, first: bool = False, broadcast: bytes | None = None,
                            release: Callable[[RoundOutcome], np.ndarray] | None = None) -> RoundReport:
        """Wait for clients (``join_timeout`` if ``first``, else ``rejoin_timeout``) and run one round.

        ``broadcast`` (e.g. the global model) is sent to every participant before the protocol starts.
        ``release`` (e.g. the privacy ledger's commit) runs on the outcome before any participant
        receives the result and returns the values to share; if it raises, the round fails and
        nothing is sent.
        """
        s = self.settings
        self._enforce_revocation()
        participants = await self._wait_for_clients(s.join_timeout if first else s.rejoin_timeout)
        report = await self._run_round(number, participants, broadcast, release)
        self.reports.append(report)
        if self.on_round is not None:
            self.on_round(report)
        return report

    async def finish(self, reason: str) -> None:
        """Tell every client there are no more rounds and close the streams."""
        for conn in list(self._conns.values()):
            conn.send_frame(wire.encode(Bye(reason=reason, final=True)))
            conn.close()
        await asyncio.sleep(0.2)  # let the goodbyes flush

    # ----------------------------------------------------------------- rounds

    async def _wait_for_clients(self, timeout: float) -> tuple[int, ...]:
        s = self.settings
        deadline = time.monotonic() + timeout
        while len(self._live()) < s.expected_clients:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._joined.clear()
            try:
                await asyncio.wait_for(self._joined.wait(), left)
            except asyncio.TimeoutError:
                break
        return tuple(sorted(self._live()))

    def _live(self) -> list[int]:
        return [cid for cid, c in self._conns.items() if not c.closed]

    async def _run_round(self, number: int, participants: tuple[int, ...], broadcast: bytes | None = None,
                         release: Callable[[RoundOutcome], np.ndarray] | None = None) -> RoundReport:
        s = self.settings
        t0 = time.perf_counter()

        def not_started(reason: str) -> RoundReport:
            log.error("round %d not started: %s", number, reason)
            return RoundReport(number, False, reason, None, participants, {}, time.perf_counter() - t0)

        if len(participants) < s.threshold:
            return not_started(f"only {len(participants)} clients connected, the threshold is {s.threshold}")
        ctx = RoundContext(
            round=number, participants=participants,
            identity_keys={cid: self._conns[cid].key for cid in participants},
            threshold=s.threshold, options=s.options, server_identity=self.credentials.identity,
            certificates={cid: self._conns[cid].cert_pem for cid in participants},
            server_certificate=self.credentials.cert_pem, read_certificate=identity_from_pem,
        )
        try:
            driver, params = self._mode.server(ctx)
        except SecAggError as exc:
            return not_started(f"{type(exc).__name__}: {exc}")
        state = _RoundState(number, set(participants))
        state.link = GrpcLink(self, state, asyncio.get_running_loop(), s.stage_timeout)
        self._round = state
        log.info("round %d: %d participants, protection=%s", number, len(participants), s.protection)
        start_frame = wire.encode(RoundStart(round=number, mode=s.protection, broadcast=broadcast is not None))
        for cid in participants:
            self._conns[cid].send_frame(start_frame)
            self._conns[cid].send_payload(params)
            if broadcast is not None:
                self._conns[cid].send_payload(broadcast)
        ok, reason, outcome = True, "", None
        try:
            outcome = await asyncio.to_thread(drive, driver, state.link)
        except SecAggError as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}"
            log.error("round %d failed: %s", number, reason)
        except Exception as exc:  # a bug in a protocol session fails the round, not the server
            ok, reason = False, f"internal error: {type(exc).__name__}: {exc}"
            log.exception("round %d failed", number)
        finally:
            self._round = None
            state.link.close()
        shared = outcome.total if ok else None
        if ok and release is not None:
            try:
                shared = release(outcome)
            except Exception as exc:  # e.g. the ledger refuses: nothing leaves, the server goes on
                ok, reason, outcome = False, f"release refused: {type(exc).__name__}: {exc}", None
                log.error("round %d: %s", number, reason)
        # float64 bytes of the aggregate as a view (no copy when it is float64 already)
        total = memoryview(np.ascontiguousarray(shared, dtype="<f8")).cast("B") if (ok and s.share_result) else b""
        included = outcome.included if ok else ()
        end = wire.encode(RoundEnd(round=number, ok=ok, reason=reason, has_total=bool(total), included=tuple(included)))
        for cid in participants:
            conn = self._conns.get(cid)
            if conn is not None and cid in state.active:
                conn.send_frame(end)
                if total:
                    conn.send_payload(total)
            if conn is not None:
                conn.unexpected = 0
        seconds = time.perf_counter() - t0
        if ok:
            log.info(
                "round %d done in %.3fs: %d included, %d dropped", number, seconds, len(included), len(state.dropped)
            )
        # a client whose input is in the sum was not dropped from the round, whatever happened to it later
        dropped = {c: r for c, r in state.dropped.items() if c not in included}
        return RoundReport(number, ok, reason, outcome, participants, dropped, seconds)

    def _send(self, state: _RoundState, out: dict[int, bytes]) -> None:
        for cid, payload in out.items():
            if cid in state.active and cid in self._conns:
                self._conns[cid].send_payload(payload)

    def _drop(self, state: _RoundState | None, cid: int, reason: str, *, kick: bool) -> None:
        conn = self._conns.get(cid)
        if state is not None and cid in state.active:
            state.active.discard(cid)
            state.dropped[cid] = reason
            log.warning("round %d: dropped client %d (%s): %s", state.number, cid, conn.peer if conn else "gone", reason)
            if conn is not None:
                conn.send_frame(wire.encode(Dropped(round=state.number, reason=reason)))
            if state.link is not None:
                state.link.lost(cid, reason)
        elif kick:
            log.warning("client %d (%s) disconnected by the server: %s", cid, conn.peer if conn else "gone", reason)
        if kick and conn is not None:
            conn.close()

    def _admit(self, conn: _Conn, first: Chunk) -> int | None:
        """At a payload's first chunk: the bytes this client may send now, or None to discard it unread.

        Only a client the running stage awaits may have a payload buffered, and only up to
        the stage's limit; anything else is read and thrown away chunk by chunk, so an
        unsolicited message never costs the server memory.
        """
        link = self._awaiting(conn)
        if link is None:
            current = self._round.link if self._round is not None else None
            stage = current.stage.name if current is not None and current.stage is not None else None
            where = "no round is running" if stage is None else f"stage {stage!r} does not await it"
            log.info("client %d (%s): discarding an unsolicited %d-chunk message: %s", conn.cid, conn.peer,
                     first.count, where)
            return None
        return self._stage_limit(link)

    def _awaiting(self, conn: _Conn) -> GrpcLink | None:
        """The round's link if its stage awaits a message from ``conn``; else None, and the
        message counts as unsolicited (past ``max_unexpected_messages`` the client is kicked)."""
        link = self._round.link if self._round is not None else None
        if link is not None and link.expects(conn.cid):
            return link
        conn.unexpected += 1
        if conn.unexpected > self.settings.max_unexpected_messages:
            raise _Kick(f"flooding: {conn.unexpected} messages the protocol did not ask for")
        return None

    def _stage_limit(self, link: GrpcLink) -> int:
        """Largest payload the current stage accepts from one client (the mode's bound if it has one)."""
        bound = link.stage.max_payload_bytes if link.stage is not None else None
        limit = self.settings.max_message_bytes
        return limit if bound is None else min(limit, int(bound))

    def _account(self, delta: int) -> None:
        self.buffered_bytes += delta
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)

    def _drop_conn(self, conn: _Conn, reason: str) -> None:
        """Drop and disconnect ``conn`` -- unless a newer connection for its id replaced it already."""
        if self._conns.get(conn.cid) is conn:
            self._drop(self._round, conn.cid, reason, kick=True)
        else:
            conn.close()

    def _deliver(self, conn: _Conn, payload: bytes | memoryview, reserved: int) -> bool:
        """Hand a complete payload to the round's link. True: the link took it with the
        ``reserved`` in-flight budget it holds (given back once the driver is done with it)."""
        link = self._awaiting(conn)
        if link is None:
            log.info("client %d: ignored a message outside its stage", conn.cid)
            return False
        if self._mode.sealed_by_sender:
            self._check_seal(conn, payload)
        # the driver thread checks it against the protocol
        return link.offer(conn.cid, payload, partial(self._inflight.give, reserved))

    @staticmethod
    def _check_seal(conn: _Conn, payload: bytes) -> None:
        """The seal must name this stream's certificate identity and verify under its key."""
        try:
            sender, body, signature = wire.unverified_envelope(payload, max_bytes=len(payload))
        except WireError as exc:
            raise _Kick(f"malformed payload: {exc}") from None
        if sender != conn.cid:
            raise _Kick(f"identity mismatch: payload sealed as client {sender} on client {conn.cid}'s certificate")
        try:
            wire.verify_envelope(sender, body, signature, conn.key)
        except InvalidSignature:
            raise _Kick("identity mismatch: payload not signed by the key bound in its certificate") from None

    def _enforce_revocation(self) -> None:
        """Re-read the revocation list if it changed; drop connected clients it now lists."""
        if not self._revocation.refresh():
            return
        for conn in list(self._conns.values()):
            if conn.serial in self._revocation.serials and not conn.closed:
                self._drop(self._round, conn.cid, f"certificate serial {conn.serial:x} was revoked", kick=True)

    def _displace(self, cid: int, cert_pem: bytes, peer: str) -> bool:
        """A second connection for ``cid``: True if it replaces the first (same or newer certificate)."""
        old = self._conns.get(cid)
        if old is None or old.closed:
            return True
        new = x509.load_pem_x509_certificate(cert_pem)
        if new.serial_number == old.serial:
            why = "the same certificate connected again"
        elif new.not_valid_before_utc > old.issued:
            why = f"a newer certificate (serial {new.serial_number:x}) connected"
        else:
            log.warning("refused client %d (%s): already connected with a certificate at least as new (from %s)",
                        cid, peer, old.peer)
            return False
        self._drop(self._round, cid, f"replaced: {why} from {peer}", kick=True)
        return True

    # ----------------------------------------------------------------- streams

    async def _session(self, request_iterator, context: grpc.aio.ServicerContext):
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        try:
            peer = identity_from_pem(pem)
            if peer.role != "client" or peer.client_id is None:
                raise SecAggError("certificate is not a client certificate")
        except SecAggError as exc:
            log.warning("refused %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"refused: {exc}")
            return
        cid = peer.client_id
        self._enforce_revocation()
        if self._revocation.is_revoked(pem):
            log.warning("refused client %d (%s): its certificate is revoked", cid, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused: this certificate has been revoked")
            return
        try:
            first = await asyncio.wait_for(context.read(), self.settings.hello_timeout)
            if first is grpc.aio.EOF:
                return
            sender, hello = wire.open_sealed(
                first, lambda sid: peer.identity_public_key if sid == cid else None,
                max_bytes=4096, expect=Hello,
            )
            if sender != cid or hello.client_id != cid:
                raise SecAggError("hello names another client")
        except asyncio.TimeoutError:
            log.warning("refused client %d (%s): no hello within %gs", cid, context.peer(), self.settings.hello_timeout)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello")
            return
        except SecAggError as exc:
            log.warning("refused client %d (%s): identity mismatch: %s", cid, context.peer(), exc)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "identity mismatch: the hello must be sealed by the Ed25519 key bound in your certificate",
            )
            return
        if not self._displace(cid, pem, context.peer()):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"client {cid} is already connected")
            return
        conn = _Conn(cid, peer.identity_public_key, pem, self.settings, context.peer())
        conn.task = asyncio.current_task()
        self._conns[cid] = conn
        log.info("client %d connected from %s", cid, context.peer())
        self._joined.set()
        reader = asyncio.ensure_future(self._read_loop(conn, context))
        try:
            while True:
                item = await conn.out.get()
                if item is None:
                    break
                for frame in [item] if isinstance(item, bytes) else item:
                    await context.write(frame)
        except Exception as exc:  # noqa: BLE001 -- any failed write means the client is gone
            log.debug("client %d: write failed: %s", cid, type(exc).__name__)
        finally:
            reader.cancel()
            conn.closed = True
            if self._conns.get(cid) is conn:  # not replaced by a newer connection for the same id
                del self._conns[cid]
                self._drop(self._round, cid, "disconnected", kick=False)

    async def _read_loop(self, conn: _Conn, context) -> None:
        frame_limit = frames.MAX_CHUNK_BYTES + frames.FRAME_OVERHEAD
        reason = (
            "disconnected (the client closed its stream, the connection was lost to keepalive or the network, "
            f"or gRPC refused a message over the {frame_limit}-byte frame limit: RESOURCE_EXHAUSTED at the client)"
        )
        reserved = 0  # bytes of the in-flight budget the current payload holds
        try:
            while True:
                data = await context.read()
                if data is grpc.aio.EOF:
                    break
                if not conn.bucket.take():
                    raise _Kick(f"rate limit: more than {self.settings.frames_per_second:g} frames/s")
                try:
                    frame = wire.decode(data, max_bytes=frame_limit, expect=Chunk)
                except WireError as exc:
                    raise _Kick(f"malformed frame: {exc}") from None
                limit = None
                if not conn.reassembler.in_progress:  # a payload begins: admit it, then wait for budget
                    limit = self._admit(conn, frame)
                    if limit is not None:
                        reserved = await self._inflight.take(limit)
                held = conn.reassembler.buffered
                try:
                    payload = conn.reassembler.feed(frame, admit=lambda first: limit)
                except WireError as exc:
                    raise _Kick(f"refused message: {exc}") from None
                finally:
                    self._account(conn.reassembler.buffered - held)
                if payload is not None:
                    if self._deliver(conn, payload, reserved):
                        reserved = 0  # the link gives it back once the driver is done with the payload
                    payload = None  # freed before its budget is given back
                if not conn.reassembler.in_progress and reserved:
                    self._inflight.give(reserved)
                    reserved = 0
        except _Kick as exc:
            reason = str(exc)
            self._drop_conn(conn, reason)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 -- connection reset and friends
            reason = f"disconnected (stream error: {type(exc).__name__})"
        finally:
            self._account(-conn.reassembler.release())
            self._inflight.give(reserved)
        self._drop_conn(conn, reason)


def connection_cap(wanted: int, reserve: int = 64) -> int:
    """``wanted`` connections, lowered to what the open-file limit allows (``reserve`` kept for files and logs)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft - reserve >= wanted:
        return wanted
    cap = max(1, soft - reserve)
    log.warning("max_connections %d lowered to %d: the open-file limit (ulimit -n) is %d", wanted, cap, soft)
    return cap


def server_memory_bound(clients: int, dim: int, bits: int = 32, inflight: int | None = None) -> int:
    """Worst-case bytes a masking round adds to a gRPC server's resident memory (docs/deployment.md).

    ``8 dim``: the float64 aggregate, whose upper half holds the running uint32 sum (the
    lower half is touched only when the sum is decoded); the masked inputs arriving at
    once (``payload_limit`` each: uploads are parsed in place, never copied), at most the
    server's ``max_inflight_bytes`` (``inflight``; None: no budget) or one payload if it
    is larger; and ``CONNECTION_BYTES`` of frames in flight per connection. Not counted:
    the process's idle baseline (interpreter, libraries, gRPC), which a deployment
    measures once.
    """
    upload = payload_limit(clients, dim, bits, masked=True)
    arriving = clients * upload if inflight is None else min(clients * upload, max(inflight, upload))
    return 8 * dim + arriving + clients * frames.CONNECTION_BYTES


def report_summary(report: RoundReport, stage_timeout: float | None = None) -> dict:
    """One JSON-able line per round: what was released, who was dropped (and why), or why it failed."""
    line = {
        "round": report.round, "ok": report.ok, "seconds": round(report.seconds, 4),
        "participants": len(report.participants),
        **({"stage_timeout": stage_timeout} if stage_timeout is not None else {}),
        "dropped": {str(c): r for c, r in sorted(report.dropped.items())},
    }
    if report.ok and report.outcome is not None:
        line["included"] = list(report.outcome.included)
        line["norm"] = float(np.linalg.norm(report.outcome.total))
        line["bytes_up_per_param"] = round(report.outcome.bytes_up_per_param, 4)
    else:
        line["reason"] = report.reason
    return line


async def serve_resumable_rounds(
    settings: ServerSettings,
    credentials: Credentials,
    state_dir,
    *,
    print_line: Callable[[dict], None] = lambda d: None,
    ready: Callable[[int], None] | None = None,
) -> bool:
    """Run the configured rounds, resuming after the last round recorded in ``state_dir``.

    A completed round is persisted (aggregate, summary, then progress marker) before the
    next one starts, so a server killed at any point restarts at the first round it had
    not finished; a round cut short by the crash is run again from scratch with fresh keys.
    """
    done = read_progress(state_dir)
    total_rounds = settings.first_round + settings.rounds
    if done >= settings.first_round:
        log.info("resuming: rounds up to %d are complete (state in %s)", done, state_dir)
        settings.first_round = done + 1
        settings.rounds = max(0, total_rounds - settings.first_round)

    def on_round(report: RoundReport) -> None:
        line = report_summary(report, settings.stage_timeout)
        if report.ok and state_dir is not None and report.outcome is not None:
            record_round(state_dir, report.round, report.outcome.total, line)
        elif state_dir is not None:
            record_failed_round(state_dir, line)
        print_line(line)

    server = AggregationServer(settings, credentials, on_round=on_round)
    port = await server.start()
    if ready is not None:
        ready(port)
    try:
        reports = await server.serve()
    finally:
        await server.stop()
    return all(r.ok for r in reports)
