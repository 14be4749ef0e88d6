"""The mod's CKKS option: a node's part of a ckks round (the workflow side: :mod:`federation.flower.ckks_server`).

The node runs :class:`secagg.ckks.session.ClientSession`, built by
:func:`~secagg.ckks.session.client_from_directory` exactly as over gRPC: the relayed
certificates are checked against the node's CA, and a round whose key holder is not the
one named in the node's config (``secagg-keyholder``) is refused. Between two messages the
session lives in the node's Flower ``Context`` (:meth:`ClientSession.snapshot`), the key
holder's secret key included -- it stays on the node, like the masking session's secrets.

Stages: ``ckks.keys`` (key holder only: a new session, the round's keys), ``ckks.upload``
(every node: train through the wrapped ClientApp, encrypt and sign ``[w * parameters, w]``;
the key holder continues its session), ``ckks.decrypt`` (key holder only, once per batch
of forwarded uploads). A node signs in a round id once (claims kept in its Context).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message

from federation.flower.mod import SESSION_RECORD, ContextRoundIds, _credentials, _field, _train
from federation.flower.records import (
    CKKS_DECRYPT,
    CKKS_KEYS,
    CKKS_UPLOAD,
    KEYHOLDER,
    FlowerCkksDirectory,
)
from federation.transport.certs import Credentials, verify_certificate
from secagg import wire
from secagg.ckks.messages import CkksDirectory
from secagg.ckks.session import ClientSession, client_from_directory
from secagg.errors import LocalProtocolError, MaliciousServerDetected
from secagg.protocol import ClientPolicy


def ckks_step(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message], record: ConfigRecord,
              stage: str, policy: ClientPolicy) -> bytes:
    """This node's answer to one ckks stage message (raises on anything it must refuse).

    ``policy.min_participants``: the node joins only rounds whose key holder decrypts sums of
    at least that many nodes.
    """
    credentials = _credentials(ctxt)
    if credentials is None:
        raise LocalProtocolError(
            "this node takes part in ckks rounds only with the deployment's CA credentials: set its node config "
            "secagg-credentials to its credential directory (secagg certs issue ID)"
        )
    rnd = _field(record, "round", int)
    if stage == CKKS_DECRYPT:
        session = _resume(ctxt, credentials, rnd, None, policy)
    elif stage in (CKKS_KEYS, CKKS_UPLOAD):
        announced = _field(record, "directory", bytes)
        session = _resume(ctxt, credentials, rnd, announced, policy) if stage == CKKS_UPLOAD else None
        if session is None:
            session = _start(msg, ctxt, credentials, rnd, announced, policy)
            if (stage == CKKS_KEYS) != session.is_holder:
                raise LocalProtocolError(f"stage {stage!r} was sent to a node that is "
                                         f"{'' if session.is_holder else 'not '}the round's key holder")
    else:
        raise LocalProtocolError(f"unknown ckks stage {stage!r}")
    try:
        if stage == CKKS_UPLOAD:
            session.set_update(_train(msg, ctxt, call_next))
        return session.receive(_field(record, "payload", bytes))
    finally:
        ctxt.state.config_records[SESSION_RECORD]["snapshot"] = session.snapshot()


def _session(ctxt: Context, credentials: Credentials, rnd: int, announced: bytes,
             policy: ClientPolicy) -> tuple[ClientSession, FlowerCkksDirectory]:
    """A new session for the round ``announced`` names, from the certificates it relays."""
    flower = wire.decode(announced, expect=FlowerCkksDirectory)
    directory = wire.decode(flower.ckks, expect=CkksDirectory)
    trusted = ctxt.node_config.get(KEYHOLDER)
    session = client_from_directory(
        directory, round=rnd, client_id=credentials.check_binding().client_id, identity=credentials.identity,
        update=None, trusted_keyholder=None if trusted is None else int(trusted),
        check_certificate=lambda pem: verify_certificate(pem, credentials.ca_pem),
        min_participants=policy.min_participants,
    )
    return session, flower


def _start(msg: Message, ctxt: Context, credentials: Credentials, rnd: int, announced: bytes,
           policy: ClientPolicy) -> ClientSession:
    session, flower = _session(ctxt, credentials, rnd, announced, policy)
    if flower.round != rnd or flower.nodes.get(session.client_id) != msg.metadata.dst_node_id:
        raise MaliciousServerDetected("the round's directory does not list this node under its certified id", 0)
    if not (math.isfinite(flower.max_weight) and flower.max_weight > 0):
        raise LocalProtocolError(f"max_weight must be a positive number, got {flower.max_weight}")
    ContextRoundIds(ctxt).claim(credentials.identity.public_bytes, session.roster.server_key, session.config.round_id)
    ctxt.state.config_records[SESSION_RECORD] = ConfigRecord({
        "ckks": announced, "snapshot": b"", "max_weight": float(flower.max_weight), "dp": list(flower.dp),
    })
    return session


def _resume(ctxt: Context, credentials: Credentials, rnd: int, announced: bytes | None,
            policy: ClientPolicy) -> ClientSession | None:
    """The node's saved session of this round (for ``announced``'s round id when given).

    None at the upload stage when the node has none for that round (it is not the key
    holder: its session starts there); at the decrypt stage a missing session is refused.
    """
    saved = ctxt.state.config_records.get(SESSION_RECORD)
    if saved is None or "ckks" not in saved:
        if announced is not None:
            return None
        raise LocalProtocolError("no ckks round in progress on this node (the earlier stages were missed)")
    if announced is not None and _round_id(saved["ckks"]) != _round_id(announced):
        return None
    session, _ = _session(ctxt, credentials, rnd, _field(saved, "ckks", bytes), policy)
    session.restore(_field(saved, "snapshot", bytes))
    return session


def _round_id(announced: bytes) -> bytes:
    flower = wire.decode(announced, expect=FlowerCkksDirectory)
    return wire.decode(flower.ckks, expect=CkksDirectory).round_id
