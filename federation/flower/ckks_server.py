"""The workflow's CKKS option: one fit round of :mod:`secagg.ckks.session` through Flower messages.

``SecAggWorkflow(protection="ckks", credentials=...)`` runs this instead of the masking stages.
After ``hello`` (identity keys and CA certificates, as for masking) the round is the one
the gRPC link runs (:mod:`secagg.ckks.mode`, through :func:`secagg.rounds.drive`), with Flower
(:class:`~federation.flower.link.FlowerLink`) moving the bytes:

  1. ``ckks.keys``: the key holder -- the one enrolled node whose certificate carries the
     CA's key-holder role -- makes the round's keys and returns the public context (for
     the nodes) and a parameters-only one (for the server);
  2. ``ckks.upload``: every node gets the public context with the strategy's fit
     instructions, trains, and uploads ``[w * parameters, w]`` encrypted and signed;
  3. ``ckks.decrypt``: the server, which holds no key, adds the uploads and forwards the
     sum and the signed uploads to the key holder in batches of at most ``forward_bytes``
     (one message each); the key holder recomputes the sum from the uploads, refuses a sum
     it did not recompute, and releases it.

The key holder is also a participant (its own update is in the sum). A node that fails or
does not answer is dropped at that stage; if the key holder is lost the round fails and
nothing is released.
"""

from __future__ import annotations

import time

import numpy as np

from federation.flower.link import FlowerLink
from federation.flower.records import CKKS_DECRYPT, CKKS_KEYS, CKKS_UPLOAD, FlowerCkksDirectory
from federation.transport.certs import identity_from_pem
from secagg import wire
from secagg.ckks import new_round_id
from secagg.ckks.messages import CkksDirectory
from secagg.ckks.mode import CkksServerRound
from secagg.ckks.session import Roster, ServerSession, ServerStage, config_of
from secagg.errors import ConfigError, NotEnoughSurvivors
from secagg.protocol import ClientPolicy
from secagg.rounds import drive

# the session's stage names -> the names the nodes' mod expects
STAGE_NAMES = {ServerStage.CONTEXT.value: CKKS_KEYS, ServerStage.UPLOAD.value: CKKS_UPLOAD,
               ServerStage.DECRYPT.value: CKKS_DECRYPT}


def ckks_mean(workflow, grid, rnd: int, arrays: list[np.ndarray], fitins: dict, report) -> list[np.ndarray]:
    """The weighted mean of the surviving nodes' parameters, aggregated under CKKS."""
    started = time.perf_counter()
    hellos = workflow._collect(grid, rnd, {nid: ("hello", b"") for nid in fitins}, report)
    nodes, identities, certificates = workflow._enrol(hellos, report)
    report.seconds["hello"] = time.perf_counter() - started
    keyholder = _keyholder(workflow, certificates)
    participants = tuple(sorted(nodes))
    _, threshold = workflow._graph(len(participants))
    directory = CkksDirectory(
        round=rnd, round_id=new_round_id(), dim=sum(int(a.size) for a in arrays) + 1, scheme=workflow.scheme,
        value_bound=workflow.clipping_range, min_clients=max(ClientPolicy().min_participants, threshold),
        participants=participants,
        keyholder=keyholder, server_certificate=workflow._credentials.cert_pem,
        certificates={c: certificates[c] for c in participants},
    )
    roster = Roster(rnd, participants, (keyholder,), identities, (identities[keyholder],))
    session = ServerSession(config_of(directory), roster, workflow._credentials.identity,
                            forward_bytes=workflow.forward_bytes)
    report.threshold = directory.min_clients
    announced = wire.encode(FlowerCkksDirectory(
        round=rnd, nodes=nodes, max_weight=workflow.max_weight,
        dp=() if workflow.privacy is None else workflow.privacy.wire_plan(), ckks=wire.encode(directory),
    ))
    link = FlowerLink(workflow, grid, rnd, nodes, report, names=STAGE_NAMES, fit_stage=CKKS_UPLOAD, fitins=fitins,
                      extra=lambda stage: {"directory": announced} if stage != CKKS_DECRYPT else None)
    # close_stage fails the round (raises) without the key holder or min_clients uploads
    outcome = drive(CkksServerRound(session), link)
    link.finish()
    report.included = tuple(nodes[cid] for cid in outcome.included)
    total = np.asarray(outcome.total, dtype=np.float64)
    weight, error = float(total[-1]), outcome.max_quantization_error
    if not weight > error:
        raise NotEnoughSurvivors("the surviving updates carry no weight (num_examples summed to 0)")
    flat = total[:-1] / weight
    # |S'/W' - S/W| <= (e + |S'/W'| e) / (W' - e) per coordinate, e the sum's error bound
    report.max_quantization_error = error * (1 + float(np.max(np.abs(flat), initial=0.0))) / (weight - error)
    out_arrays, offset = [], 0
    for a in arrays:
        out_arrays.append(flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
        offset += a.size
    return out_arrays


def _keyholder(workflow, certificates: dict[int, bytes]) -> int:
    """The workflow's ``keyholder``, or the one enrolled node the CA made a key holder."""
    holders = [cid for cid, pem in certificates.items() if identity_from_pem(pem).keyholder]
    if workflow.keyholder is not None:
        if workflow.keyholder not in holders:
            raise NotEnoughSurvivors(f"the key holder (client {workflow.keyholder}) did not enrol with a key-holder "
                                     "certificate this round; nothing can be aggregated")
        return workflow.keyholder
    if len(holders) != 1:
        raise NotEnoughSurvivors(
            f"{len(holders)} enrolled nodes hold a key-holder certificate; a ckks round needs exactly one "
            "(or keyholder= naming the one the nodes trust)")
    return holders[0]


def check_options(workflow) -> None:
    """What the ckks option needs, checked when the workflow is built."""
    if workflow._credentials is None:
        raise ConfigError(
            "protection='ckks' needs the deployment's CA: pass credentials= (secagg certs issue --server); the nodes "
            "take the key holder from its certificate, so without one no node can trust a key holder")
    if workflow.scheme not in ("ckks", "bfv"):
        raise ConfigError(f"scheme must be 'ckks' or 'bfv', got {workflow.scheme!r}")
    if not (isinstance(workflow.forward_bytes, int) and workflow.forward_bytes > 0):
        raise ConfigError("forward_bytes must be a positive number of bytes")
