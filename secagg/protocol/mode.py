"""The masking protocol as a round mode (:mod:`secagg.rounds`): links carry its bytes.

The server side wraps :class:`secagg.protocol.server.ServerSession`, the client side
:class:`secagg.protocol.client.ClientSession`; this module only adapts their calls.

Peer identities. A masking client verifies the signed key advertisements of its
neighbours, so it needs their Ed25519 keys -- and must not take them on the server's
word (a server that swapped keys could read the secret shares). The round parameters
therefore carry the participants' *certificates*: each client checks every certificate
with the ``check_certificate`` callback its link hands in (against the deployment CA) and
takes the Ed25519 key the CA bound to the client id. The server's own protocol key comes
from the server certificate, checked the same way.

Options (``[server.options]`` in server.toml): ``dim`` (required), ``clip`` (required:
the agreed L2 or per-coordinate bound), ``bits`` (32), ``clip_mode`` ("l2"), ``scale``
(fixed-point scale; default: the largest that cannot overflow), ``graph`` ("complete" or
"sparse" for SecAgg+), ``degree`` and ``dropout`` (sparse graph sizing), ``threshold``
(sparse graphs), ``collusion`` (the fraction of colluding clients the plan assumes;
default 1/3). The round is planned by :func:`secagg.protocol.plan.plan_round`, the one
threshold rule: the server's ``threshold`` is a floor, raised to the secure minimum. Each
client checks the plan against its own policy (``min_participants``, ``collusion``,
``round_ids`` in client.toml) and refuses less.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from secagg import wire
from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, InvalidSignature, RemoteProtocolError, ReplayError
from secagg.protocol.client import ClientSession
from secagg.protocol.common import SERVER_ID, Stage, codec_of
from secagg.protocol.messages import RoundConfig
from secagg.protocol.plan import ClientPolicy, plan_round
from secagg.protocol.server import ServerSession, ServerState
from secagg.rounds import ClientContext, Mode, RoundContext, RoundOutcome, register_mode


@wire.message
class MaskingDirectory(wire.Message):
    """Round parameters: the CA-signed certificates of the server and of every participant."""

    TYPE = "transport.masking.directory"
    FIELD_LIMITS: ClassVar[dict[str, int]] = {"server_certificate": 8192, "certificates": 8192}
    round: int
    server_certificate: bytes
    certificates: dict[int, bytes]


def codec_from_options(options: Mapping[str, object], n: int) -> FixedPointCodec:
    """The fixed-point encoding the options agree on, for up to ``n`` clients."""
    try:
        clip = float(options["clip"])  # type: ignore[arg-type]
    except KeyError:
        raise ConfigError("the masking mode needs a `clip` option (the agreed bound on each update)") from None
    bits = int(options.get("bits", 32))  # type: ignore[call-overload]
    clip_mode = str(options.get("clip_mode", "l2"))
    if "scale" in options:
        return FixedPointCodec(clip=clip, scale=float(options["scale"]), bits=bits, max_clients=n,  # type: ignore[arg-type]
                               clip_mode=clip_mode)
    return FixedPointCodec.for_clients(clip=clip, max_clients=n, bits=bits, clip_mode=clip_mode)


def plan_from_options(clients: tuple[int, ...], options: Mapping[str, object], threshold: int | None,
                      round_id: bytes | None = None) -> RoundConfig:
    """The round's plan from a link's options (:func:`plan_round`, the one threshold rule)."""
    dim = int(options.get("dim", 0))  # type: ignore[call-overload]
    if dim <= 0:
        raise ConfigError("the masking mode needs a positive `dim` option")
    graph = str(options.get("graph", "complete"))
    codec = codec_from_options(options, len(clients))
    if graph == "sparse":
        threshold = int(options["threshold"]) if "threshold" in options else None  # type: ignore[call-overload]
    degree = int(options["degree"]) if "degree" in options else None  # type: ignore[call-overload]
    policy = ClientPolicy(collusion=float(options.get("collusion", ClientPolicy.collusion)))  # type: ignore[arg-type]
    return plan_round(
        clients, dim, codec, graph=graph, threshold=threshold,
        dropout=float(options.get("dropout", 0.1)), degree=degree, policy=policy, round_id=round_id,  # type: ignore[arg-type]
    )


def payload_limit(clients: int, dim: int, bits: int = 32, *, masked: bool = False) -> int:
    """Largest sealed message a client may send at a stage: 64 KiB + 1 KiB per client, plus
    the packed vector (ceil(bits / 8) bytes a coordinate) at the masked-input stage."""
    return (64 << 10) + (1 << 10) * clients + (dim * -(-bits // 8) if masked else 0)


class MaskingServerRound:
    """:class:`~secagg.rounds.ServerRound` over a :class:`ServerSession`."""

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
        vector (at most 4 bytes per coordinate). A link refuses a larger message at its
        first chunk, before holding any of it.
        """
        cfg = self.session.config
        return payload_limit(len(cfg.clients), cfg.dim, cfg.bits, masked=self.session.stage is Stage.MASKED_INPUT)

    @property
    def done(self) -> bool:
        return self.session.state is ServerState.DONE

    def outcome(self) -> RoundOutcome:
        included = self.session.included
        error = codec_of(self.session.config).sum_error_bound(len(included))
        return RoundOutcome(total=self.session.result, included=included, max_quantization_error=error,
                            protection="masking")


class MaskingClientRound:
    """:class:`~secagg.rounds.ClientRound` over a :class:`ClientSession`, built from a checked directory."""

    def __init__(self, ctx: ClientContext, params: bytes) -> None:
        directory = wire.decode(params, expect=MaskingDirectory)
        if directory.round != ctx.round:
            raise ReplayError(f"directory of round {directory.round} sent in round {ctx.round}")
        check = ctx.check_certificate
        if check is None:
            raise ConfigError("a masking client needs its CA certificate to check its peers")
        server = check(directory.server_certificate)
        if server.role != "server":
            raise InvalidSignature("the relayed server certificate is not a server certificate")
        identities = {SERVER_ID: server.identity_public_key}
        for cid, pem in directory.certificates.items():
            peer = check(pem)
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


def _server(ctx: RoundContext) -> tuple[MaskingServerRound, bytes]:
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
