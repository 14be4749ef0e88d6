"""Step-by-step driver for protocol tests: an honest or scripted server and its clients."""

from __future__ import annotations

import numpy as np

from secagg import wire
from secagg.encoding import FixedPointCodec
from secagg.errors import MaliciousServerDetected, SecAggError
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.messages import ConsistencyRequest, UnmaskRequest, consistency_payload
from secagg.protocol.simulate import InMemoryRound


def make_round(n=6, dim=8, graph="complete", threshold=None, degree=None, seed=0, policy=None):
    rng = np.random.default_rng(seed)
    updates = rng.uniform(-1, 1, (n, dim))
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=n, clip_mode="coordinate")
    return InMemoryRound(updates, codec, graph=graph, threshold=threshold, degree=degree, policy=policy), updates


def step(session, outgoing, skip=()):
    """Deliver ``outgoing`` to every client not in ``skip``; feed replies to the server."""
    for client_id, message in outgoing.items():
        if client_id in skip:
            continue
        session.server.receive(session.clients[client_id].receive(message))
    return session.server.close_stage()


def run_until(session, stage: Stage):
    """Run honest stages until the server is about to send ``stage``'s request."""
    outgoing = session.server.start()
    for current in Stage:
        if current is stage:
            return outgoing
        outgoing = step(session, outgoing)
    raise AssertionError("unreachable")


def server_seal(session, msg):
    return wire.seal(msg, SERVER_ID, session.server_identity)


def split_attack(session, victim: int, colluders: set[int], group_a: set[int], group_b: set[int],
                 outgoing=None):
    """Run the split attack from the consistency stage on; return the victim's shares the server got.

    Colluders are real sessions that ran honestly so far; the server reads the shares they
    hold and signs with their identity keys. ``outgoing``: the consistency stage's requests
    when the caller already ran the round that far (e.g. to read the round's graph). Returns
    (self-seed share holders, mask-key share holders, honest clients that refused).
    """
    if outgoing is None:
        outgoing = run_until(session, Stage.CONSISTENCY)
    rid, digest = session.config.round_id, session.server._digest
    everyone = tuple(sorted(outgoing))
    told_alive, told_dropped = everyone, tuple(c for c in everyone if c != victim)
    signatures = {told_alive: {}, told_dropped: {}}
    for view in signatures:
        for c in colluders:
            signatures[view][c] = session.clients[c]._identity.sign(consistency_payload(rid, digest, view))
    refused: set[int] = set()
    groups = [(group_a | {victim}, told_alive, ()), (group_b, told_dropped, (victim,))]
    for members, view, _ in groups:
        for c in members:
            try:
                reply = session.clients[c].receive(server_seal(session, ConsistencyRequest(rid, view)))
            except SecAggError:
                refused.add(c)
                continue
            signatures[view][c] = wire.open_sealed(reply, lambda p: session.identities[p])[1].signature
    holds_victim = {c for c in colluders if victim in session.clients[c]._held}
    seed_holders, key_holders = set(holds_victim), set(holds_victim)
    for members, view, dropped in groups:
        for c in members - refused:
            request = UnmaskRequest(rid, view, dropped, signatures[view])
            try:
                reply = session.clients[c].receive(server_seal(session, request))
            except MaliciousServerDetected:
                refused.add(c)
                continue
            response = wire.open_sealed(reply, lambda p: session.identities[p])[1]
            if victim in response.self_seed_shares:
                seed_holders.add(c)
            if victim in response.mask_key_shares:
                key_holders.add(c)
    return seed_holders, key_holders, refused
