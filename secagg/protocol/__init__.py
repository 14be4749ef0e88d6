"""The pairwise-masking secure aggregation protocol as sans-IO state machines.

``ClientSession`` and ``ServerSession`` take sealed bytes in and give sealed bytes out; a
transport (in-memory, gRPC, Ray) only moves those bytes and decides when a stage closes.
"""

from secagg.protocol.client import ClientPolicy, ClientSession, ClientState
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.server import ServerSession, ServerState, plan_round

__all__ = [
    "ClientPolicy", "ClientSession", "ClientState", "SERVER_ID", "Stage",
    "ServerSession", "ServerState", "plan_round",
]
