"""gRPC client with mutual TLS (asyncio): one stream to the server, one protocol session per round.

The client presents its CA-issued certificate, sends a :class:`Hello` sealed by its Ed25519
identity key, then for every ``RoundStart`` builds the mode's :class:`ClientRound` from the
parameters and its input vector, hands it every payload the server sends, and streams the
sealed replies back in chunks. A round the client cannot take part in (its session raised,
e.g. because the server misbehaved) is abandoned; the client waits for the next one.

Many clients can share one event loop (the load benchmark does): each has its own channel,
TLS connection and subchannel pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from federation.transport import frames
from federation.transport.certs import Credentials
from federation.transport.frames import (
    Bye,
    Chunk,
    Dropped,
    Hello,
    Reassembler,
    RoundEnd,
    RoundStart,
)
from secagg import __version__, wire
from secagg.errors import SecAggError
from secagg.protocol.plan import ClientPolicy
from secagg.protocol.replay import FileRoundIds
from secagg.rounds import ClientContext, get_mode

log = logging.getLogger("secagg.client")


@dataclass
class ClientSettings:
    server: str = "localhost:50051"
    server_name: str | None = None  # TLS name to check when `server` is an address not in the cert
    chunk_bytes: int = frames.DEFAULT_CHUNK_BYTES
    max_message_bytes: int = 256 << 20
    connect_timeout: float = 30.0
    # Protections this client takes part in. The server names the protection of each round; a
    # client never lets it pick the insecure "none" baseline unless listed here.
    protections: tuple[str, ...] = ("masking", "ckks")
    # This client's masking policy (secagg.protocol.plan.ClientPolicy): the smallest sum it
    # accepts to be part of, the fraction of other participants it assumes collude with the
    # server, and the file of round ids it already signed in (kept across restarts).
    min_participants: int = 3
    collusion: float = 1 / 3
    round_ids: str | None = None
    # ckks: the client id of the key holder this client trusts. Its certificate must carry
    # the CA's key-holder role; a round naming any other key holder is refused. Unset: this
    # client refuses every ckks round (the server never chooses the key holder for it).
    keyholder: int | None = None


def policy_from_settings(settings: ClientSettings) -> ClientPolicy:
    """This client's masking policy from its settings (client.toml), round ids kept in a file if named."""
    store = {} if settings.round_ids is None else {"round_ids": FileRoundIds(settings.round_ids)}
    return ClientPolicy(min_participants=int(settings.min_participants), collusion=float(settings.collusion), **store)


@dataclass
class ClientReport:
    """What one client saw: the released aggregate per round, and rounds it was dropped from."""

    client_id: int
    rounds: dict[int, np.ndarray | None] = field(default_factory=dict)
    included: dict[int, tuple[int, ...]] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    bye: str = ""  # the server's goodbye; empty if the connection ended without one
    finished: bool = False  # the server said there are no more rounds
    lost: str = ""  # why the connection was lost, if it was


def channel_options(settings: ClientSettings) -> list[tuple[str, object]]:
    frame_limit = frames.MAX_CHUNK_BYTES + frames.FRAME_OVERHEAD
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", frame_limit),
        ("grpc.max_send_message_length", frame_limit),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),
    ]
    if settings.server_name:
        opts.append(("grpc.ssl_target_name_override", settings.server_name))
    return opts


def secure_channel(settings: ClientSettings, credentials: Credentials) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_pem,
        private_key=credentials.key_pem,
        certificate_chain=credentials.cert_pem,
    )
    return grpc.aio.secure_channel(settings.server, creds, options=channel_options(settings))


async def run_client(
    settings: ClientSettings,
    credentials: Credentials,
    input_for_round: Callable[[int], np.ndarray] | None,
    *,
    client_id: int | None = None,
    on_round_end: Callable[[int, np.ndarray | None], None] | None = None,
    make_round: Callable[[str, ClientContext, bytes], object] | None = None,
    update_from_broadcast: Callable[[int, bytes], np.ndarray] | None = None,
) -> ClientReport:
    """Connect, take part in rounds until the server says goodbye, return what was released.

    ``make_round(mode, ctx, params)`` replaces the registered mode's client factory (to wrap
    the protocol session, or to test a misbehaving client). In rounds that carry a
    broadcast (the global model), the update is ``update_from_broadcast(round, broadcast)``
    (local training), else ``input_for_round(round)``; either runs in a worker thread so
    the connection stays serviced.
    """
    peer = credentials.check_binding()
    cid = peer.client_id if client_id is None else client_id
    if cid is None:
        raise SecAggError("the credentials are a server's, not a client's")
    report = ClientReport(cid)
    policy = policy_from_settings(settings)
    reassembler = Reassembler(settings.max_message_bytes)
    seq = 0
    session = None
    current, protection = -1, ""
    expecting: list[str] = []  # payloads that precede the protocol's: "params", "broadcast"
    got: dict[str, bytes] = {}
    pending_end: RoundEnd | None = None
    try:
        async with secure_channel(settings, credentials) as channel:
            await asyncio.wait_for(channel.channel_ready(), settings.connect_timeout)
            call = channel.stream_stream(frames.METHOD)()
            await call.write(wire.seal(Hello(client_id=cid, software=f"secagg {__version__}"), cid, credentials.identity))
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    break
                frame = wire.decode(data, max_bytes=frames.MAX_CHUNK_BYTES + frames.FRAME_OVERHEAD)
                if isinstance(frame, RoundStart):
                    current, protection, session = frame.round, frame.mode, None
                    expecting, got = ["params", "broadcast"] if frame.broadcast else ["params"], {}
                    if protection not in settings.protections:
                        log.error("client %d: refusing round %d: protection %r is not in this client's protections %s",
                                  cid, current, protection, list(settings.protections))
                        report.failed[current] = f"refused protection {protection!r}"
                        protection = ""  # payloads of this round are read and ignored
                elif isinstance(frame, Chunk):
                    payload = reassembler.feed(frame)
                    if payload is None:
                        continue
                    if pending_end is not None:
                        end, pending_end = pending_end, None
                        self_total = np.frombuffer(payload, dtype="<f8").copy()
                        report.rounds[end.round] = self_total
                        if on_round_end is not None:
                            on_round_end(end.round, self_total)
                        continue
                    if expecting:
                        got[expecting.pop(0)] = payload
                        if expecting:
                            continue
                        if not protection:
                            continue
                        try:
                            if "broadcast" in got:
                                if update_from_broadcast is None:
                                    raise SecAggError("the server broadcast a model but this client does not train")
                                update = await asyncio.to_thread(update_from_broadcast, current, got["broadcast"])
                            elif input_for_round is None:
                                raise SecAggError("this client only trains, and the server sent no model")
                            else:
                                update = await asyncio.to_thread(input_for_round, current)
                            ctx = ClientContext(
                                round=current, client_id=cid, identity=credentials.identity,
                                update=update, check_certificate=credentials.verify_peer, policy=policy,
                                keyholder=settings.keyholder,
                            )
                            build = make_round or (lambda name, ctx, params: get_mode(name).client(ctx, params))
                            session = build(protection, ctx, got["params"])
                        except SecAggError as exc:
                            log.error("client %d: cannot take part in round %d: %s", cid, current, exc)
                            report.failed[current] = f"{type(exc).__name__}: {exc}"
                            session = None
                        continue
                    if session is None:
                        continue
                    try:
                        reply = session.receive(payload)
                    except SecAggError as exc:
                        log.error("client %d: abandoning round %d: %s", cid, current, exc)
                        report.failed[current] = f"{type(exc).__name__}: {exc}"
                        session = None
                        continue
                    if reply is not None:
                        seq += 1
                        for f in frames.chunk_payload(reply, seq, settings.chunk_bytes):
                            await call.write(f)
                elif isinstance(frame, RoundEnd):
                    session = None
                    if frame.ok:
                        report.included[frame.round] = frame.included
                    else:
                        report.failed[frame.round] = frame.reason
                    if frame.ok and frame.has_total:
                        pending_end = frame  # the aggregate follows as a chunked payload
                    else:
                        report.rounds[frame.round] = None
                        if on_round_end is not None:
                            on_round_end(frame.round, None)
                elif isinstance(frame, Dropped):
                    log.warning("client %d: dropped from round %d: %s", cid, frame.round, frame.reason)
                    report.dropped[frame.round] = frame.reason
                    session = None
                elif isinstance(frame, Bye):
                    report.bye, report.finished = frame.reason, frame.final
                    break
            with contextlib.suppress(grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                await call.done_writing()
    except grpc.aio.AioRpcError as exc:
        report.lost = f"{exc.code().name}: {exc.details()}"
        log.warning("client %d: connection to %s lost: %s", cid, settings.server, report.lost)
    except SecAggError as exc:  # the server broke the framing rules; do not trust this stream
        report.lost = f"protocol violation by the server: {type(exc).__name__}: {exc}"
        log.error("client %d: %s", cid, report.lost)
    except asyncio.TimeoutError:
        report.lost = f"could not reach {settings.server} within {settings.connect_timeout:g}s"
        log.warning("client %d: %s", cid, report.lost)
    return report
