"""The ckks protection as a round mode (:mod:`secagg.rounds`): a thin adapter to :mod:`secagg.ckks.session`.

The round itself (stages, checks, who may send what) is :class:`~secagg.ckks.session.ServerSession`
and :class:`~secagg.ckks.session.ClientSession`; this module builds them from a
:class:`~secagg.rounds.RoundContext` / :class:`~secagg.rounds.ClientContext`. Links relay
CA-signed certificates in the directory; each client checks them with the
``check_certificate`` callback its link hands in.

The key holder is chosen by the clients, never by the server: each client names the key
holder it trusts in its own configuration (``keyholder`` in ``[client]``), and that
client's certificate must carry the CA's key-holder role (``secagg certs issue ID --role
keyholder``); a directory naming any other key holder is refused by every client.

Options: ``dim`` (required), ``clip`` (per-coordinate bound every client enforces,
required), ``scheme`` ("ckks" or "bfv"), ``keyholder`` (client id; default: the one
participant whose certificate carries the key-holder role -- clients refuse any other),
``forward_bytes`` (bound on the uploads forwarded to the key holder in one message;
default 64 MiB, see :class:`~secagg.ckks.session.ServerSession`).
"""

from __future__ import annotations

from collections.abc import Mapping

from secagg import wire
from secagg.ckks.messages import CkksDirectory
from secagg.ckks.roles import new_round_id
from secagg.ckks.session import (
    FORWARD_BYTES,
    ClientSession,
    Roster,
    ServerSession,
    ServerStage,
    client_from_directory,
    config_of,
)
from secagg.errors import ConfigError, NotEnoughSurvivors
from secagg.rounds import ClientContext, Mode, RoundContext, RoundOutcome, register_mode


class CkksServerRound:
    """:class:`~secagg.rounds.ServerRound` over a ckks :class:`ServerSession`."""

    def __init__(self, session: ServerSession) -> None:
        self.session = session

    def start(self) -> dict[int, bytes]:
        return self.session.start()

    def stage(self) -> str:
        return self.session.stage.value

    def max_payload_bytes(self) -> int:
        return self.session.max_payload_bytes()

    def awaiting(self) -> frozenset[int]:
        return self.session.awaiting() if self.session.stage is not ServerStage.FAILED else frozenset()

    def receive(self, client_id: int, payload: bytes) -> None:
        self.session.receive(client_id, payload)

    def close_stage(self) -> dict[int, bytes]:
        return self.session.close_stage()

    @property
    def done(self) -> bool:
        return self.session.done

    def outcome(self) -> RoundOutcome:
        out = self.session.outcome()
        return RoundOutcome(total=out.total, included=out.included, max_quantization_error=float(out.error_bound),
                            protection="ckks")


class CkksClientRound:
    """:class:`~secagg.rounds.ClientRound` over a ckks :class:`ClientSession`.

    Building it checks the directory (refusing a round this client must not join) before
    any key exists.
    """

    def __init__(self, ctx: ClientContext, params: bytes) -> None:
        if ctx.check_certificate is None:
            raise ConfigError("a ckks client needs its CA certificate to check the relayed certificates")
        self.session: ClientSession = client_from_directory(
            wire.decode(params, expect=CkksDirectory), round=ctx.round, client_id=ctx.client_id,
            identity=ctx.identity, update=ctx.update, trusted_keyholder=ctx.keyholder,
            check_certificate=ctx.check_certificate,
            # the client's own floor on the sums its update joins (its masking policy's)
            min_participants=int(getattr(ctx.policy, "min_participants", 2)),
        )
        self.step = 0  # messages received so far

    @property
    def config(self):
        return self.session.config

    @property
    def holder(self):
        """The key holder role, when this client is the round's key holder and made its keys."""
        return self.session.keyholder.holder if self.session.keyholder is not None else None

    def receive(self, payload: bytes) -> bytes | None:
        self.step += 1
        return self.session.receive(payload)

    @property
    def done(self) -> bool:
        return self.session.done


def dim_and_bound(options: Mapping[str, object]) -> tuple[int, float]:
    """The ckks mode's two required options, checked: ``dim`` and ``clip`` (the per-coordinate
    bound every client enforces). Every link that plans a ckks round from options uses this."""
    dim = int(options.get("dim", 0))  # type: ignore[call-overload]
    if dim <= 0:
        raise ConfigError("the ckks mode needs a positive `dim` option")
    if "clip" not in options:
        raise ConfigError("the ckks mode needs `clip`, the per-coordinate bound every client enforces")
    return dim, float(options["clip"])  # type: ignore[arg-type]


def _server(ctx: RoundContext) -> tuple[CkksServerRound, bytes]:
    o = ctx.options
    dim, bound = dim_and_bound(o)
    keyholder = int(o["keyholder"]) if "keyholder" in o else _certified_keyholder(ctx)  # type: ignore[call-overload]
    if keyholder not in ctx.participants:
        raise NotEnoughSurvivors(f"the key holder (client {keyholder}) is not connected; the round cannot run")
    directory = CkksDirectory(
        round=ctx.round, round_id=new_round_id(), dim=dim, scheme=str(o.get("scheme", "ckks")),
        value_bound=bound, min_clients=max(2, int(ctx.threshold)),
        participants=tuple(ctx.participants), keyholder=keyholder,
        server_certificate=ctx.server_certificate,
        certificates={cid: ctx.certificates[cid] for cid in ctx.participants},
    )
    roster = Roster(ctx.round, tuple(ctx.participants), (keyholder,),
                    {c: ctx.identity_keys[c] for c in ctx.participants}, (ctx.identity_keys[keyholder],))
    session = ServerSession(config_of(directory), roster, ctx.server_identity,
                            forward_bytes=int(o.get("forward_bytes", FORWARD_BYTES)))
    return CkksServerRound(session), wire.encode(directory)


def _certified_keyholder(ctx: RoundContext) -> int:
    """The one connected participant whose certificate carries the CA's key-holder role."""
    read = ctx.read_certificate
    if read is None:
        raise ConfigError("name the key holder (option `keyholder`): this link hands in no certificates to read")
    holders = [cid for cid in ctx.participants if cid in ctx.certificates and read(ctx.certificates[cid]).keyholder]
    if len(holders) != 1:
        raise NotEnoughSurvivors(
            f"{len(holders)} connected clients hold a key-holder certificate; a ckks round needs exactly one "
            "(or the `keyholder` option naming the one the clients trust)"
        )
    return holders[0]


register_mode(Mode("ckks", _server, CkksClientRound, sealed_by_sender=False))
