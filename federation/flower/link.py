"""Flower as one more link of the round seam: each stage is one ``send_and_receive``.

The workflow's rounds (masking and ckks) run through :func:`secagg.rounds.drive`, the one
round loop; :class:`FlowerLink` only moves the stage's bytes to the nodes and back, and
keeps the workflow's per-round report (who was dropped at which stage and why, seconds
per stage, bytes received).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from secagg.rounds import Reply, StageView


class FlowerLink:
    """:class:`secagg.rounds.Link` over a Flower grid for one round of the workflow.

    ``nodes`` maps protocol client id -> Flower node id. ``names`` maps a mode's stage name
    to the stage name the nodes' mod expects (identity where absent). ``extra(stage)`` is
    the record fields that stage's message carries beside the payload (e.g. the
    directory); the ``fit_stage`` message carries the strategy's fit instructions
    ``fitins`` (node id -> record dict).
    """

    def __init__(self, workflow, grid, rnd: int, nodes: Mapping[int, int], report, *,
                 extra: Callable[[str], dict | None], fit_stage: str, fitins: Mapping[int, object],
                 names: Mapping[str, str] | None = None) -> None:
        self._workflow, self._grid, self._rnd, self._report = workflow, grid, rnd, report
        self._nodes = dict(nodes)
        self._clients = {nid: cid for cid, nid in nodes.items()}
        self._extra, self._fit_stage, self._fitins = extra, fit_stage, fitins
        self._names = dict(names or {})
        self._stage = ""
        self._started: float | None = None
        self._sends: dict[int, tuple[str, bytes]] = {}
        self._handed: tuple[int, int] | None = None  # (client, bytes) of the reply the driver is checking

    def deliver(self, stage: StageView, outgoing: Mapping[int, bytes]) -> None:
        self.finish()
        self._stage = self._names.get(stage.name, stage.name)
        self._started = time.perf_counter() if outgoing else None  # the closing view sends nothing
        self._sends = {self._nodes[c]: (self._stage, payload) for c, payload in outgoing.items()}

    def replies(self, stage: StageView) -> Iterator[Reply]:
        sends, self._sends = self._sends, {}
        if not sends:
            return
        records = self._workflow._collect(
            self._grid, self._rnd, sends, self._report, extra=self._extra(self._stage),
            fit=self._fitins if self._stage == self._fit_stage else None)
        for nid, record in records.items():
            payload = record["payload"]
            client = self._clients[nid]
            # counted as received; taken back in drop() if the driver refuses it
            self._report.bytes_up += len(payload)
            self._handed = (client, len(payload))
            yield Reply(client, payload)
        self._handed = None

    def drop(self, client: int, reason: str) -> None:
        if self._handed is not None and self._handed[0] == client:
            self._report.bytes_up -= self._handed[1]  # the server refused this payload: not counted
        # a node the grid already lost keeps the reason the grid gave
        self._report.dropped.setdefault(self._nodes[client], f"{self._stage}: {reason}")

    def finish(self) -> None:
        """Book the seconds of the stage being carried (from its send until now)."""
        if self._started is not None:
            seconds = self._report.seconds
            seconds[self._stage] = seconds.get(self._stage, 0.0) + time.perf_counter() - self._started
            self._started = None
