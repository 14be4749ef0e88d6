"""The client mod: this project's client state machine inside a Flower ``ClientApp``.

Counterpart of ``flwr.client.mod.secaggplus_mod``. For every secure-aggregation message
the mod rebuilds the node's :class:`~secagg.protocol.ClientSession` from the node's
Flower ``Context`` (a SuperNode keeps no Python object between two messages), hands it
the server's sealed bytes, stores it again and replies with the sealed answer. At the
masked-input stage it calls the wrapped ClientApp (local training), builds the row
``[w * parameters, w]`` with ``w = num_examples / max_weight`` -- the sample count travels
inside the secure sum, never beside it -- and masks it. Nothing else leaves the node: no
parameters, no sample count, no metrics.

A ``train`` message without the secure-aggregation record is refused: a ClientApp wrapped
by this mod never releases an update in the clear. Any protocol error (a lying server, a
threshold below the client's policy, too few live neighbours) raises, which Flower turns
into an error reply; the session is then aborted for the rest of the round and reveals
nothing more.

The same mod takes part in the workflow's CKKS rounds (``protection="ckks"``; stages
``ckks.*``, see :mod:`federation.flower.ckks_client`): the same hello, the same trained row,
encrypted under the round's key instead of masked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from federation.flower.records import (
    CKKS_STAGES,
    CREDENTIALS,
    DP_KEYS,
    HELLO,
    RECORD,
    FlowerDirectory,
)
from federation.transport.certs import Credentials, verify_certificate
from secagg import wire
from secagg.errors import InputError, LocalProtocolError, MaliciousServerDetected, PrivacyError
from secagg.keys import IdentityKey
from secagg.protocol import ClientPolicy, ClientSession
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.replay import MemoryRoundIds

NODE_RECORD = "secagg.node"  # the node's long-term Ed25519 identity (private bytes)
SESSION_RECORD = "secagg.session"  # the current round's paused session


def make_secagg_mod(*, policy: ClientPolicy | None = None,
                    node_config: Callable[[Context], dict] | None = None) -> Callable[[Message, Context, Callable], Message]:
    """A client mod enforcing ``policy`` (the protocol's default policy when None).

    The round ids the node has signed in are kept in its Flower Context (a SuperNode may run
    each message in a fresh process), whatever store ``policy.round_ids`` names.
    ``node_config(ctxt)``: node-config entries (``secagg-credentials``, ``secagg-keyholder``)
    for nodes whose own config lacks them -- Flower's simulation engine gives a node only
    ``partition-id`` and ``num-partitions``; a node's own entries win.
    """

    def mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        for key, value in (node_config(ctxt) if node_config is not None else {}).items():
            ctxt.node_config.setdefault(key, value)
        if RECORD not in msg.content.config_records:
            raise LocalProtocolError(
                "this ClientApp sends its updates only through secure aggregation, but the server "
                "asked for a plain `train` reply; run federation.flower.SecAggPlusWorkflow on the server"
            )
        record = msg.content.config_records[RECORD]
        stage, payload = _field(record, "stage", str), _field(record, "payload", bytes)
        if stage == HELLO:
            return _hello(msg, ctxt)
        if stage in CKKS_STAGES:
            from federation.flower.ckks_client import ckks_step  # TenSEAL only for ckks rounds

            return _reply(msg, stage, ckks_step(msg, ctxt, call_next, record, stage, policy or ClientPolicy()))
        node_policy = dataclasses.replace(policy or ClientPolicy(), round_ids=ContextRoundIds(ctxt))
        if stage == Stage.ADVERTISE.value:
            session = _start_session(msg, ctxt, record, node_policy)
        else:
            session = _resume(ctxt, node_policy)
        if stage == Stage.MASKED_INPUT.value:
            session.set_update(_train(msg, ctxt, call_next))
        try:
            answer = session.receive(payload)
        finally:
            _store(ctxt, session)
        return _reply(msg, stage, answer)

    return mod


secagg_mod = make_secagg_mod()


class ContextRoundIds(MemoryRoundIds):
    """The node's round-id claims (see :mod:`secagg.protocol.replay`), kept in its Context."""

    def __init__(self, ctxt: Context, capacity: int = 4096) -> None:
        super().__init__(capacity)
        self._ctxt = ctxt
        node = ctxt.state.config_records.get(NODE_RECORD)
        for key in [] if node is None else node.get("round_ids", []):
            self._seen[key] = None

    def _record(self, key: bytes) -> None:
        node = self._ctxt.state.config_records.setdefault(NODE_RECORD, ConfigRecord({}))
        node["round_ids"] = list(self._seen)[-self.capacity:]  # the new claim is the last one


def _hello(msg: Message, ctxt: Context) -> Message:
    """The node's identity public key (and certificate, with credentials) for a new round."""
    ctxt.state.config_records.pop(SESSION_RECORD, None)  # a new round starts: forget any earlier one
    credentials = _credentials(ctxt)
    if credentials is not None:
        reply = _reply(msg, HELLO, credentials.identity.public_bytes)
        reply.content.config_records[RECORD]["certificate"] = credentials.cert_pem
        return reply
    node = ctxt.state.config_records.get(NODE_RECORD)
    if node is None or "identity" not in node:
        identity = IdentityKey.generate()
        ctxt.state.config_records[NODE_RECORD] = ConfigRecord({"identity": identity.private_bytes()})
    else:
        identity = IdentityKey.from_private_bytes(_field(node, "identity", bytes))
    return _reply(msg, HELLO, identity.public_bytes)


def _credentials(ctxt: Context) -> Credentials | None:
    """The node's CA-issued credentials, when its node config names a credential directory."""
    path = ctxt.node_config.get(CREDENTIALS)
    if not path:
        return None
    credentials = Credentials.load(str(path))
    credentials.check_binding()
    return credentials


def _identity(ctxt: Context) -> IdentityKey:
    credentials = _credentials(ctxt)
    if credentials is not None:
        return credentials.identity
    node = ctxt.state.config_records.get(NODE_RECORD)
    if node is None or "identity" not in node:
        raise LocalProtocolError("no identity key on this node: the round must start with the hello stage")
    return IdentityKey.from_private_bytes(_field(node, "identity", bytes))


def _check_certificates(directory: FlowerDirectory, pid: int, credentials: Credentials) -> None:
    """Every identity key in the directory must be the one the deployment's CA bound to that party."""
    if set(directory.certificates) != set(directory.identities):
        raise MaliciousServerDetected(
            "this node takes part only with CA-certified peers, and the directory lacks certificates", SERVER_ID
        )
    for party, pem in directory.certificates.items():
        peer = verify_certificate(pem, credentials.ca_pem)
        role_ok = peer.role == "server" if party == SERVER_ID else (peer.role == "client" and peer.client_id == party)
        if not role_ok or peer.identity_public_key != directory.identities[party]:
            raise MaliciousServerDetected(f"the certificate relayed for party {party} does not bind its key", SERVER_ID)
    if credentials.check_binding().client_id != pid:
        raise MaliciousServerDetected("the directory gives this node another id than its certificate", SERVER_ID)


def _start_session(msg: Message, ctxt: Context, record: ConfigRecord, policy: ClientPolicy | None) -> ClientSession:
    directory = wire.decode(_field(record, "directory", bytes), expect=FlowerDirectory)
    identity = _identity(ctxt)
    mine = [pid for pid, node in directory.nodes.items() if node == msg.metadata.dst_node_id]
    if len(mine) != 1:
        raise MaliciousServerDetected("the round's directory does not list this node exactly once", SERVER_ID)
    pid = mine[0]
    if directory.identities.get(pid) != identity.public_bytes:
        raise MaliciousServerDetected("the round's directory holds another identity key for this node", SERVER_ID)
    credentials = _credentials(ctxt)
    if credentials is not None:
        _check_certificates(directory, pid, credentials)
    if not (math.isfinite(directory.max_weight) and directory.max_weight > 0):
        raise LocalProtocolError(f"max_weight must be a positive number, got {directory.max_weight}")
    session = ClientSession(pid, identity, directory.identities, policy=policy)
    ctxt.state.config_records[SESSION_RECORD] = ConfigRecord({
        "snapshot": session.snapshot(), "max_weight": float(directory.max_weight), "dp": list(directory.dp),
    })
    return session


def _resume(ctxt: Context, policy: ClientPolicy | None) -> ClientSession:
    saved = ctxt.state.config_records.get(SESSION_RECORD)
    if saved is None:
        raise LocalProtocolError("no secure-aggregation round in progress on this node (the advertise stage was missed)")
    return ClientSession.resume(_field(saved, "snapshot", bytes), _identity(ctxt), policy=policy)


def _store(ctxt: Context, session: ClientSession) -> None:
    ctxt.state.config_records[SESSION_RECORD]["snapshot"] = session.snapshot()


def _train(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> np.ndarray:
    """Run the wrapped ClientApp; return the row to mask, ``[w * parameters, w]``."""
    saved = ctxt.state.config_records[SESSION_RECORD]
    del msg.content.config_records[RECORD]  # the wrapped ClientApp sees the fit instructions only
    out = call_next(msg, ctxt)
    if out.has_error():
        raise LocalProtocolError(f"local training failed: {out.error.reason}")
    fitres = compat.recorddict_to_fitres(out.content, keep_input=True)
    _check_privacy(tuple(saved["dp"]), fitres.metrics)
    max_weight = float(saved["max_weight"])
    n = fitres.num_examples
    if not 0 < n <= max_weight:
        raise InputError(
            f"num_examples={n} is outside (0, max_weight={max_weight:g}]: the weighted sum could overflow; "
            "raise max_weight on the server"
        )
    arrays = parameters_to_ndarrays(fitres.parameters)
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
    w = n / max_weight
    return np.append(w * flat, w)


def _check_privacy(plan: tuple[float, ...], metrics: dict) -> None:
    """Refuse an update whose DP-SGD is not covered by the spend the server records."""
    if not plan:
        return
    missing = [k for k in DP_KEYS if k not in metrics]
    if missing:
        raise PrivacyError(
            "the server records DP-SGD spend for this round but the ClientApp reported none "
            f"(missing metrics {missing}); return federation.flower.dp_metrics(...) from fit()"
        )
    noise, rate, steps, clip = (float(metrics[k]) for k in DP_KEYS)
    p_noise, p_rate, p_steps, _ = plan
    if noise < p_noise or rate > p_rate or steps > p_steps or not clip > 0:
        raise PrivacyError(
            f"this client's DP-SGD (noise {noise:g}, sampling rate {rate:g}, {steps:g} steps) spends more than "
            f"the server records (noise {p_noise:g}, rate {p_rate:g}, {p_steps:g} steps); not uploading"
        )


def _reply(msg: Message, stage: str, payload: bytes) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord({"stage": stage, "payload": payload})}), reply_to=msg)


def _field(record: ConfigRecord, key: str, kind: type):
    value = record.get(key)
    if type(value) is not kind:
        raise LocalProtocolError(f"secure-aggregation record field {key!r} must be {kind.__name__}")
    return value
