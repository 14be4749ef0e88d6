"""The masking protocol (``secagg.protocol``) as a transport mode.

The server side wraps :class:`secagg.protocol.server.ServerSession`, the client side
:class:`secagg.protocol.client.ClientSession`; this module only adapts their calls.

Peer identities. A masking client verifies the signed key advertisements of its
neighbours, so it needs their Ed25519 keys -- and must not take them on the server's
word (a server that swapped keys could read the secret shares). The round parameters
therefore carry the participants' *certificates*: each client checks every certificate
against the deployment CA (:func:`~federation.transport.certs.verify_certificate`) and
takes the Ed25519 key the CA bound to the client id. The server's own protocol key comes
from the server certificate, checked the same way.

Options (``[server.options]`` in server.toml): ``dim`` (required), ``clip`` (required:
the agreed L2 or per-coordinate bound), ``bits`` (32), ``clip_mode`` ("l2"),
``graph`` ("complete" or "sparse" for SecAgg+), ``degree`` and ``dropout`` (sparse
graph sizing), ``threshold`` (sparse graphs), ``collusion`` (the fraction of colluding
clients the plan assumes; default 1/3). The round is planned by
:func:`secagg.protocol.plan.plan_round`, the one threshold rule: the server's ``threshold``
is a floor, raised to the secure minimum. Each client checks the plan against its own
policy (``min_participants``, ``collusion``, ``round_ids`` in client.toml) and refuses less.
"""

from __future__ import annotations

from typing import ClassVar

from federation.transport.certs import verify_certificate
from federation.transport.frames import CONNECTION_BYTES
from federation.transport.rounds import (
    ClientContext,
    Mode,
    RoundContext,
    RoundOutcome,
    register_mode,
)
from secagg import wire
from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, InvalidSignature, RemoteProtocolError, ReplayError
from secagg.protocol.client import ClientSession
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.plan import ClientPolicy, plan_round
from secagg.protocol.replay import FileRoundIds
from secagg.protocol.server import ServerSession, ServerState


@wire.message
class MaskingDirectory(wire.Message):
    """Round parameters: the CA-signed certificates of the server and of every participant."""

    TYPE = "transport.masking.directory"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"server_certificate": 8192, "certificates": 8192}
    round: int
    server_certificate: bytes
    certificates: dict[int, bytes]


def codec_from_options(options, n: int) -> FixedPointCodec:
    try:
        clip = float(options["clip"])
    except KeyError:
        raise ConfigError("the masking mode needs a `clip` option (the agreed bound on each update)") from None
    bits = int(options.get("bits", 32))
    clip_mode = str(options.get("clip_mode", "l2"))
    if "scale" in options:
        return FixedPointCodec(clip=clip, scale=float(options["scale"]), bits=bits, max_clients=n, clip_mode=clip_mode)
    return FixedPointCodec.for_clients(clip=clip, max_clients=n, bits=bits, clip_mode=clip_mode)


def plan_from_options(clients: tuple[int, ...], options, threshold: int | None, round_id: bytes | None = None):
    dim = int(options.get("dim", 0))
    if dim <= 0:
        raise ConfigError("the masking mode needs a positive `dim` option")
    graph = str(options.get("graph", "complete"))
    codec = codec_from_options(options, len(clients))
    if graph == "sparse":
        threshold = int(options["threshold"]) if "threshold" in options else None
    degree = int(options["degree"]) if "degree" in options else None
    policy = ClientPolicy(collusion=float(options.get("collusion", ClientPolicy.collusion)))
    return plan_round(
        clients, dim, codec, graph=graph, threshold=threshold,
        dropout=float(options.get("dropout", 0.1)), degree=degree, policy=policy, round_id=round_id,
    )


def policy_from_settings(settings) -> ClientPolicy:
    """A gRPC client's masking policy from its settings (client.toml), round ids kept in a file if named."""
    store = {} if settings.round_ids is None else {"round_ids": FileRoundIds(settings.round_ids)}
    return ClientPolicy(min_participants=int(settings.min_participants), collusion=float(settings.collusion), **store)


def payload_limit(clients: int, dim: int, bits: int = 32, *, masked: bool = False) -> int:
    """Largest sealed message a client may send at a stage: 64 KiB + 1 KiB per client, plus
    the packed vector (ceil(bits / 8) bytes a coordinate) at the masked-input stage."""
    return (64 << 10) + (1 << 10) * clients + (dim * -(-bits // 8) if masked else 0)


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
    return 8 * dim + arriving + clients * CONNECTION_BYTES


class MaskingServerRound:
    def __init__(self, session: ServerSession) -> None:
        self.session = session

    def start(self) -> dict[int, bytes]:
        return self.session.start()

    def awaiting(self) -> frozenset[int]:
        return self.session.expected()

    def stage(self) -> str:
        return self.session.stage.value if self.session.stage is not None else "done"

    def receive(self, client_id: int, payload: bytes) -> None:
        sender = self.session.receive(payload)
        if sender != client_id:
            raise RemoteProtocolError(f"payload of client {sender} arrived on client {client_id}'s stream", client_id)

    def close_stage(self) -> dict[int, bytes]:
        return self.session.close_stage()

    def max_payload_bytes(self) -> int:
        """Largest sealed message one client may send at the current stage.

        Key, share and unmask messages grow with the number of clients (at most 1 KiB per
        peer with their signatures and ciphertexts); only the masked input carries the
        vector (at most 4 bytes per coordinate). The transport refuses a larger message
        at its first chunk, before holding any of it.
        """
        cfg = self.session.config
        return payload_limit(len(cfg.clients), cfg.dim, cfg.bits, masked=self.session.stage is Stage.MASKED_INPUT)

    @property
    def done(self) -> bool:
        return self.session.state is ServerState.DONE

    def outcome(self) -> RoundOutcome:
        dropped = {c: f"dropped at stage {stage}" for stage, ids in self.session.dropped_at.items() for c in ids}
        dropped.update(self.session.rejected)
        return RoundOutcome(total=self.session.result, included=self.session.included, dropped=dropped)


class MaskingClientRound:
    def __init__(self, ctx: ClientContext, params: bytes) -> None:
        directory = wire.decode(params, expect=MaskingDirectory)
        if directory.round != ctx.round:
            raise ReplayError(f"directory of round {directory.round} sent in round {ctx.round}")
        if not ctx.ca_pem:
            raise ConfigError("a masking client needs the CA certificate to check its peers")
        server = verify_certificate(directory.server_certificate, ctx.ca_pem)
        if server.role != "server":
            raise InvalidSignature("the relayed server certificate is not a server certificate")
        identities = {SERVER_ID: server.identity_public_key}
        for cid, pem in directory.certificates.items():
            peer = verify_certificate(pem, ctx.ca_pem)
            if peer.role != "client" or peer.client_id != cid:
                raise InvalidSignature(f"the certificate relayed for client {cid} names someone else")
            identities[cid] = peer.identity_public_key
        if identities.get(ctx.client_id) != ctx.identity.public_bytes:
            raise InvalidSignature("the directory does not hold this client's own certificate")
        self.session = ClientSession(ctx.client_id, ctx.identity, identities, update=ctx.update, policy=ctx.policy)

    def receive(self, payload: bytes) -> bytes | memoryview | None:
        return self.session.receive_view(payload)  # the masked input is sent from the buffer it was sealed in

    @property
    def done(self) -> bool:
        return self.session.state.value == "done"


def _server(ctx: RoundContext):
    config = plan_from_options(ctx.participants, ctx.options, ctx.threshold)
    if ctx.server_identity is None:
        raise ConfigError("the masking mode needs the server's identity key")
    session = ServerSession(config, ctx.server_identity, dict(ctx.identity_keys))
    params = wire.encode(
        MaskingDirectory(
            round=ctx.round, server_certificate=ctx.server_certificate,
            certificates={cid: ctx.certificates[cid] for cid in ctx.participants},
        )
    )
    return MaskingServerRound(session), params


register_mode(Mode("masking", _server, MaskingClientRound))
