"""Step-by-step driver for protocol tests: an honest or scripted server and its clients."""

from __future__ import annotations

import numpy as np

from secagg import wire
from secagg.encoding import FixedPointCodec
from secagg.protocol.common import SERVER_ID, Stage
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
