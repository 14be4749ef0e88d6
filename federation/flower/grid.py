"""An in-process Flower link: every node's ClientApp runs in this process, for tests and benchmarks.

:class:`InProcessGrid` is a Flower ``Grid`` that hands each message to its node's
``ClientApp`` at once, one after another, keeps one ``Context`` per node between
messages (as a SuperNode does) and turns an exception in the app into an error reply
(as Flower's simulation engine does). No Ray, no polling, no network: what remains is the
apps' and the protocol's own work, so two secure-aggregation implementations can be timed
inside the same Flower message flow.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Flower ``Grid`` delivering messages to ClientApps in this process (see module docstring)."""

    def __init__(self, app: ClientApp, num_nodes: int, *, run_id: int = 1,
                 node_config: Callable[[int], dict] | None = None) -> None:
        """``num_nodes`` nodes with node_config ``partition-id`` 0..n-1 and ``num-partitions`` n,
        plus what ``node_config(partition_id)`` adds."""
        self._app = app
        self._run = Run.create_empty(run_id)
        # What a ServerApp process knows about itself (Flower's runtime sets it before main()).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, run_id
        # Flower node ids are large random integers; any distinct ones will do.
        self.node_ids = [(0x5EC << 40) + 7919 * (i + 1) for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, state=RecordDict(), run_config={}, node_config={
                "partition-id": i, "num-partitions": num_nodes, **(node_config(i) if node_config else {})})
            for i, nid in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0
        self.client_seconds = 0.0  # time spent inside the ClientApps (all nodes, all messages)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            self.messages_sent += 1
            delivered = copy.deepcopy(msg)  # as over a wire: the node never shares the server's objects
            started = time.perf_counter()
            try:
                reply = self._app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 -- as the simulation engine: the app's exception becomes an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=delivered)
            self.client_seconds += time.perf_counter() - started
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
