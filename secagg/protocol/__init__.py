"""The pairwise-masking secure aggregation protocol as sans-IO state machines.

``ClientSession`` and ``ServerSession`` take sealed bytes in and give sealed bytes out; a
transport (in-memory, gRPC, Ray) only moves those bytes and decides when a stage closes.
"""

from secagg.protocol.client import ClientSession, ClientState
from secagg.protocol.common import SERVER_ID, Stage
from secagg.protocol.plan import ClientPolicy, MaskingPlan, min_threshold, plan_masking, plan_round
from secagg.protocol.replay import FileRoundIds, MemoryRoundIds
from secagg.protocol.server import ServerSession, ServerState

__all__ = [
    "ClientPolicy", "ClientSession", "ClientState", "FileRoundIds", "MaskingPlan", "MemoryRoundIds",
    "SERVER_ID", "Stage", "ServerSession", "ServerState", "min_threshold", "plan_masking", "plan_round",
]
