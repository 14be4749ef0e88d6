"""The server workflow: this project's server state machine inside a Flower ``ServerApp``.

Counterpart of ``flwr.server.workflow.SecAggPlusWorkflow``, with the same constructor and
the same place in a legacy Flower app (``DefaultWorkflow(fit_workflow=...)`` with a
``LegacyContext``). One fit round:

  1. the strategy's ``configure_fit`` samples the nodes; with DP configured, the round's
     spend is reserved in the privacy ledger before any node trains (write-ahead);
  2. ``hello``: every sampled node sends its Ed25519 identity key; the nodes that answered
     get protocol ids 1..n, and the round is planned (graph degree from ``num_shares``,
     threshold from ``reconstruction_threshold`` raised to the secure minimum of
     :func:`secagg.protocol.plan.plan_round`, the rule clients enforce);
  3. the five protocol stages of :class:`~secagg.protocol.ServerSession` (advertise, share,
     masked input, consistency, unmask), one Flower ``send_and_receive`` each; the
     masked-input request carries the strategy's fit instructions, as in Flower's workflow;
  4. the unmasked sum ``[sum w_k p_k, sum w_k]`` gives the weighted mean of the survivors'
     parameters, which is handed to ``strategy.aggregate_fit`` as every survivor's result
     (so FedAvg, FedProx, FedAdam/FedYogi/FedAdagrad apply their server step to it), and
     the ledger entry is committed; a failed round is recorded as aborted (its spend counts).

A node that errors or does not answer within ``timeout`` is dropped at that stage; the
protocol recovers its masks as long as ``threshold`` neighbours remain.

``protection="ckks"`` replaces the masking stages by a CKKS round (:mod:`federation.flower.ckks_server`):
the same hello, the same weighted row, the same strategy step and ledger; a certified key
holder among the nodes decrypts, the server holds no key.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from federation.flower.link import FlowerLink
from federation.flower.records import HELLO, RECORD, FlowerDirectory, FlowerPrivacy
from federation.transport.certs import Credentials, verify_certificate
from privacy.ledger import Ledger, Spend
from secagg import wire
from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, InvalidSignature, NotEnoughSurvivors, SecAggError
from secagg.keys import IdentityKey
from secagg.protocol import ServerSession, Stage, plan_round
from secagg.protocol.common import SERVER_ID
from secagg.protocol.mode import MaskingServerRound
from secagg.rounds import drive

log = logging.getLogger("secagg.flower")


@dataclass
class RoundReport:
    """What one secure round did: who was sampled, counted and dropped, and where time went."""

    round: int
    sampled: tuple[int, ...] = ()
    included: tuple[int, ...] = ()  # Flower node ids whose update is in the aggregate
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> stage and reason
    threshold: int = 0
    degree: int = 0
    aborted: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    max_quantization_error: float = 0.0


class SecAggWorkflow:
    """Secure aggregation of a Flower fit round with this project's masking protocol.

    Arguments as Flower's ``SecAggPlusWorkflow``: ``num_shares`` (neighbourhood size, a
    count or a fraction of the sampled nodes; 1 or 1.0 = everyone, the complete graph),
    ``reconstruction_threshold`` (count or fraction of a neighbourhood; raised to the secure
    minimum of the planner, the least clients accept), ``max_weight`` (public bound on ``num_examples``),
    ``clipping_range`` (per-coordinate bound on parameters), ``modulus_range`` (2^bits of the
    masking ring, at most 2^32) and ``timeout`` (seconds per stage). ``quantization_range``
    is accepted for compatibility and not used: the encoding takes the finest fixed-point
    scale at which the round's sum cannot overflow.

    ``privacy``: record-level DP-SGD spend to write in a privacy ledger every round.
    ``credentials``: the server's credential directory (``secagg certs issue --server``);
    then only nodes with a certificate of the same CA take part, and every node checks its
    peers' certificates (see :mod:`federation.flower.records`).

    ``protection``: "masking" (default) or "ckks" (needs ``credentials``; ``mode=`` is its old
    name). CKKS options:
    ``scheme`` ("ckks" or "bfv"), ``keyholder`` (the key holder's client id; default: the
    one enrolled node whose certificate carries the key-holder role -- nodes refuse any
    other than the one their node config names), ``forward_bytes`` (bound on the uploads
    forwarded to the key holder in one message). ``clipping_range`` is the per-coordinate
    bound every node clips to; ``reconstruction_threshold`` gives the fewest nodes the key
    holder decrypts a sum of (at least the nodes' default ``min_participants``, 3; a node
    refuses a round below its own policy's).
    """

    def __init__(
        self,
        num_shares: float = 1.0,
        reconstruction_threshold: float = 0.5,
        *,
        max_weight: float = 1000.0,
        clipping_range: float = 8.0,
        quantization_range: int = 4194304,
        modulus_range: int = 4294967296,
        timeout: float | None = None,
        privacy: FlowerPrivacy | None = None,
        credentials: str | os.PathLike | None = None,
        protection: str = "masking",
        scheme: str = "ckks",
        keyholder: int | None = None,
        forward_bytes: int = 64 << 20,
        mode: str | None = None,
    ) -> None:
        if mode is not None:
            warnings.warn(f"SecAggWorkflow(mode={mode!r}) is now SecAggWorkflow(protection={mode!r}); `mode=` will "
                          "be removed", FutureWarning, stacklevel=2)
            protection = mode
        if isinstance(num_shares, bool) or not isinstance(num_shares, (int, float)) or num_shares <= 0:
            raise ConfigError("num_shares must be a positive count or fraction")
        if isinstance(reconstruction_threshold, bool) or not isinstance(reconstruction_threshold, (int, float)):
            raise ConfigError("reconstruction_threshold must be a count or a fraction")
        if isinstance(reconstruction_threshold, float) and not 0 < reconstruction_threshold <= 1:
            raise ConfigError("reconstruction_threshold as a fraction must be in (0, 1]")
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ConfigError("max_weight must be a positive number")
        if not (math.isfinite(clipping_range) and clipping_range > 0):
            raise ConfigError("clipping_range must be a positive number")
        if not isinstance(modulus_range, int) or modulus_range < 2**8 or modulus_range > 2**32 or modulus_range & (modulus_range - 1):
            raise ConfigError("modulus_range must be a power of two between 2^8 and 2^32")
        self.num_shares = 1.0 if num_shares == 1 else num_shares
        self.reconstruction_threshold = 1.0 if reconstruction_threshold == 1 else reconstruction_threshold
        self.max_weight = float(max_weight)
        self.clipping_range = float(clipping_range)
        self.quantization_range = quantization_range
        self.bits = modulus_range.bit_length() - 1
        self.timeout = timeout
        self.privacy = privacy
        self.reports: list[RoundReport] = []
        self._ledger: Ledger | None = None
        self._credentials: Credentials | None = None
        if credentials is not None:
            self._credentials = Credentials.load(credentials)
            if self._credentials.check_binding().role != "server":
                raise ConfigError(f"{credentials} holds a client certificate; issue one with `secagg certs issue --server`")
        if protection not in ("masking", "ckks"):
            raise ConfigError(f"protection must be 'masking' or 'ckks', got {protection!r}")
        self.protection, self.scheme, self.keyholder, self.forward_bytes = protection, scheme, keyholder, forward_bytes
        if protection == "ckks":
            from federation.flower import ckks_server  # TenSEAL only for the ckks option

            ckks_server.check_options(self)

    # -- Flower entry point ---------------------------------------------------------------

    def __call__(self, grid, context: LegacyContext) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        proxy_fitins = context.strategy.configure_fit(rnd, parameters, context.client_manager)
        report = RoundReport(round=rnd)
        self.reports.append(report)
        if not proxy_fitins:
            report.aborted = "configure_fit selected no nodes"
            return
        fitins = {proxy.node_id: compat.fitins_to_recorddict(ins, True) for proxy, ins in proxy_fitins}
        proxies = {proxy.node_id: proxy for proxy, _ in proxy_fitins}
        report.sampled = tuple(sorted(fitins))
        ledger, entry = self._reserve(rnd, len(fitins))
        try:
            mean = self._secure_mean(grid, rnd, parameters_to_ndarrays(parameters), fitins, report)
        except SecAggError as exc:
            report.aborted = f"{type(exc).__name__}: {exc}"
            log.error("round %d: secure aggregation abandoned, nothing was unmasked: %s", rnd, report.aborted)
            if ledger is not None:
                ledger.abort(entry, note=report.aborted)
            return
        aggregate = ndarrays_to_parameters(mean)
        # Every survivor's result is the weighted mean: the strategy learns nothing per node and
        # a FedAvg-family server step applies to the mean (weights of equal vectors do not matter).
        results = [(proxies[nid], FitRes(Status(Code.OK, "secure aggregate"), aggregate, 1, {}))
                   for nid in report.included]
        failures = [RuntimeError(f"node {nid}: {why}") for nid, why in sorted(report.dropped.items())]
        new_parameters, metrics = context.strategy.aggregate_fit(rnd, results, failures)
        if new_parameters is not None:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(new_parameters, True)
            context.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)
        if ledger is not None:
            ledger.commit(entry, participants=len(report.included))

    # -- the secure round -------------------------------------------------------------------

    def _secure_mean(self, grid, rnd: int, arrays: list[np.ndarray], fitins: dict[int, RecordDict],
                     report: RoundReport) -> list[np.ndarray]:
        if self.protection == "ckks":
            from federation.flower import ckks_server

            return ckks_server.ckks_mean(self, grid, rnd, arrays, fitins, report)
        started = time.perf_counter()
        hellos = self._collect(grid, rnd, {nid: (HELLO, b"") for nid in fitins}, report)
        nodes, identities, certificates = self._enrol(hellos, report)
        report.seconds[HELLO] = time.perf_counter() - started
        n = len(nodes)
        degree, threshold = self._graph(n)
        dim = sum(int(a.size) for a in arrays) + 1
        codec = FixedPointCodec.for_clients(clip=self.clipping_range, max_clients=n, bits=self.bits,
                                            clip_mode="coordinate")
        config = self._plan(tuple(nodes), dim, codec, degree, threshold)
        report.threshold, report.degree = config.threshold, config.degree
        server_identity = self._round_identity()
        ids = {SERVER_ID: server_identity.public_bytes, **identities}
        if certificates:
            certificates[SERVER_ID] = self._credentials.cert_pem
        session = ServerSession(config, server_identity, ids)
        directory = wire.encode(FlowerDirectory(
            round=rnd, nodes=nodes, identities=ids, certificates=certificates, max_weight=self.max_weight,
            dp=() if self.privacy is None else self.privacy.wire_plan(),
        ))
        link = FlowerLink(self, grid, rnd, nodes, report, fit_stage=Stage.MASKED_INPUT.value, fitins=fitins,
                          extra=lambda stage: {"directory": directory} if stage == Stage.ADVERTISE.value else None)
        outcome = drive(MaskingServerRound(session), link)
        link.finish()
        report.included = tuple(nodes[pid] for pid in outcome.included)
        report.max_quantization_error = codec.sum_error_bound(len(outcome.included))
        total = np.asarray(outcome.total, dtype=np.float64)
        weight = float(total[-1])
        if not weight > 0:
            raise NotEnoughSurvivors("the surviving updates carry no weight (num_examples summed to 0)")
        flat = total[:-1] / weight
        out, offset = [], 0
        for a in arrays:
            out.append(flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
            offset += a.size
        return out

    def _collect(self, grid, rnd: int, sends: dict[int, tuple[str, bytes]], report: RoundReport, *,
                 extra: dict | None = None, fit: dict[int, RecordDict] | None = None) -> dict[int, ConfigRecord]:
        """One Flower round trip: send each node its stage message, return the records that came back."""
        messages = []
        for nid, (stage, payload) in sends.items():
            record = ConfigRecord({"stage": stage, "round": rnd, "payload": payload, **(extra or {})})
            content = fit[nid] if fit is not None else RecordDict()
            content.config_records[RECORD] = record
            messages.append(Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN,
                                    group_id=str(rnd)))
        replies: dict[int, ConfigRecord] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            nid = reply.metadata.src_node_id
            stage = sends.get(nid, ("?", b""))[0]
            if nid not in sends:
                continue
            if reply.has_error():
                report.dropped[nid] = f"{stage}: {reply.error.reason}"
                continue
            record = reply.content.config_records.get(RECORD)
            payload = None if record is None else record.get("payload")
            if record is None or record.get("stage") != stage or not isinstance(payload, bytes):
                report.dropped[nid] = f"{stage}: reply without a secure-aggregation record"
                continue
            replies[nid] = record
        for nid in set(sends) - set(replies) - set(report.dropped):
            report.dropped[nid] = f"{sends[nid][0]}: no reply within the timeout"
        return replies

    def _graph(self, n: int) -> tuple[int, int]:
        """(degree, threshold) for n nodes from num_shares and reconstruction_threshold."""
        size = round(self.num_shares * n) if isinstance(self.num_shares, float) else int(self.num_shares)
        degree = min(max(size, 3), n) - 1
        if degree < n - 1 and degree % 2:
            degree += 1  # sparse neighbourhoods have an even degree (odd size), as in Flower
        degree = min(degree, n - 1)
        size = degree + 1
        t = self.reconstruction_threshold
        threshold = round(t * size) if isinstance(t, float) else int(t)
        return degree, min(threshold, size)

    def _plan(self, nodes: tuple[int, ...], dim: int, codec: FixedPointCodec, degree: int, threshold: int):
        """The round's parameters from the one planning rule; what the nodes' policies refuse is raised."""
        n = len(nodes)
        sparse = degree < n - 1
        try:
            config = plan_round(nodes, dim, codec, graph="sparse" if sparse else "complete",
                                threshold=threshold, degree=degree if sparse else None)
        except ConfigError:
            if not sparse:
                raise
            log.warning("num_shares gives degree %d, too small for %d nodes under the clients' collusion bound; "
                        "using the smallest secure degree instead", degree, n)
            config = plan_round(nodes, dim, codec, graph="sparse")
        if config.threshold > threshold:
            log.warning("reconstruction threshold %d raised to %d: clients refuse less (with up to a third of "
                        "the other nodes colluding, a lower threshold lets the server unmask one node)",
                        threshold, config.threshold)
        return config

    def _enrol(self, hellos: dict[int, ConfigRecord], report: RoundReport):
        """Protocol ids, identity keys and certificates of the nodes that answered ``hello``.

        Without credentials the nodes get ids 1..n and their keys are taken as sent. With
        credentials a node must send a certificate of this deployment's CA that binds the key
        it sent; its protocol id is the client id in the certificate.
        """
        nodes: dict[int, int] = {}
        identities: dict[int, bytes] = {}
        certificates: dict[int, bytes] = {}
        if self._credentials is None:
            for pid, nid in enumerate(sorted(hellos), start=1):
                nodes[pid], identities[pid] = nid, hellos[nid]["payload"]
        else:
            for nid in sorted(hellos):
                pem = hellos[nid].get("certificate")
                try:
                    if not isinstance(pem, bytes):
                        raise InvalidSignature("no certificate")
                    peer = verify_certificate(pem, self._credentials.ca_pem)
                except SecAggError as exc:
                    report.dropped[nid] = f"hello: {type(exc).__name__}: {exc}"
                    continue
                if peer.role != "client" or peer.identity_public_key != hellos[nid]["payload"] or peer.client_id in nodes:
                    report.dropped[nid] = "hello: certificate does not bind the key sent, or its client id is taken"
                    continue
                nodes[peer.client_id], identities[peer.client_id] = nid, peer.identity_public_key
                certificates[peer.client_id] = pem
        bad = [pid for pid, key in identities.items() if len(key) != 32]
        for pid in bad:
            report.dropped[nodes.pop(pid)] = "hello: malformed identity key"
            identities.pop(pid)
            certificates.pop(pid, None)
        if len(set(identities.values())) != len(identities):
            raise NotEnoughSurvivors("two nodes sent the same identity key; the round is abandoned")
        if len(identities) < 2:
            raise NotEnoughSurvivors(f"only {len(identities)} node(s) answered; secure aggregation needs 2")
        return nodes, identities, certificates

    def _round_identity(self) -> IdentityKey:
        """The server's signing key: the CA-certified one, or a fresh one each round (sent in the directory)."""
        if self._credentials is not None:
            return self._credentials.identity
        return IdentityKey.generate()

    def _reserve(self, rnd: int, participants: int):
        if self.privacy is None:
            return None, None
        p = self.privacy
        if self._ledger is None:
            # Only the enforcing accountant's epsilon is stored per row (the others are recomputable
            # from the stored events): a reservation then costs one accounting, not three.
            self._ledger = Ledger(p.ledger, budget_epsilon=p.budget_epsilon, delta=p.delta,
                                  accountant=p.accountant, track=(p.accountant,))
        entry = self._ledger.reserve(Spend(p.event(), round=rnd, participants=participants,
                                           note=f"flower: dpsgd, {self.protection}"))
        return self._ledger, entry
