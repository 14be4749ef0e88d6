"""The round seam (secagg.rounds): one driver loop for every link."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from secagg.errors import NotEnoughSurvivors
from secagg.rounds import InMemoryLink, Reply, StageView, drive

ROOT = Path(__file__).resolve().parents[1]

def _stage_closers() -> set[str]:
    """Files that call ``close_stage()`` other than to delegate to a wrapped session."""
    found: set[str] = set()
    for pkg in ("secagg", "privacy", "federation", "benchmarks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            delegates = {id(n) for f in ast.walk(tree)
                         if isinstance(f, ast.FunctionDef) and f.name == "close_stage" for n in ast.walk(f)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "close_stage" and id(node) not in delegates):
                    found.add(str(path.relative_to(ROOT)))
    return found


def test_the_data_path_in_the_architecture_doc_names_real_code():
    """Every dotted name and source path docs/architecture.md's data-path section quotes exists."""
    import importlib
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## One round's data path"):]
    names = set(re.findall(r"`((?:secagg|federation)\.[A-Za-z_.]+)`", section))
    paths = set(re.findall(r"`((?:secagg|federation|tests)/[\w/]+\.py)`", section))
    assert names and paths
    for path in paths:
        assert (ROOT / path).is_file(), path
    for name in names:
        parts = name.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attr in parts[split:]:
                obj = getattr(obj, attr)
            break
        else:
            raise AssertionError(f"{name} names no module")


def test_one_driver_loop_closes_protocol_stages():
    """Only secagg.rounds.drive closes a stage: in process, gRPC, Ray and Flower are links of it."""
    assert _stage_closers() == {"secagg/rounds.py"}


def test_one_federation_round_loop():
    """``Federation.run_round`` is the only round of every federation class (in process, Ray,
    gRPC, shops): a backend plugs in an executor and an aggregator, it does not copy the round."""
    classes: dict[str, tuple[str, list[str], bool]] = {}  # name -> (file, base names, defines run_round)
    for pkg in ("secagg", "privacy", "federation", "benchmarks", "examples"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                    defines = any(isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == "run_round"
                                  for f in node.body)
                    classes[node.name] = (str(path.relative_to(ROOT)), bases, defines)

    def is_federation(name: str) -> bool:
        return name == "Federation" or any(is_federation(b) for b in classes.get(name, ("", [], False))[1])

    federations = {name for name in classes if is_federation(name)}
    assert {"Federation", "GrpcFederation", "ShopsFederation"} <= federations
    defining = {(classes[n][0], n) for n in federations if classes[n][2]}
    assert defining == {("federation/engine.py", "Federation")}


class _Counter:
    """A two-stage server round: each client sends one integer per stage; the total is their sum."""

    def __init__(self, clients, threshold):
        self.clients, self.threshold = tuple(clients), threshold
        self.got: dict[int, list[int]] = {c: [] for c in self.clients}
        self.index, self.live = 0, set(self.clients)

    def start(self):
        return {c: b"0" for c in self.clients}

    def stage(self):
        return ("first", "second", "done")[self.index]

    def awaiting(self):
        return frozenset(c for c in self.live if len(self.got[c]) == self.index) if self.index < 2 else frozenset()

    def max_payload_bytes(self):
        return 16

    def receive(self, client_id, payload):
        if not payload.isdigit():
            raise NotEnoughSurvivors(f"client {client_id} sent a non-number")  # any typed error refuses it
        self.got[client_id].append(int(payload))

    def close_stage(self):
        self.live = {c for c in self.live if len(self.got[c]) == self.index + 1}
        if len(self.live) < self.threshold:
            raise NotEnoughSurvivors(f"{len(self.live)} clients left")
        self.index += 1
        return {c: str(self.index).encode() for c in self.live} if self.index < 2 else {}

    @property
    def done(self):
        return self.index == 2

    def outcome(self):
        from secagg.rounds import RoundOutcome

        ids = tuple(sorted(self.live))
        return RoundOutcome(total=np.array([float(sum(sum(self.got[c]) for c in ids))]), included=ids)


class _Party:
    def __init__(self, value, bad_at=None):
        self.value, self.bad_at = value, bad_at

    def receive(self, payload):
        return b"x" if payload.decode() == self.bad_at else str(self.value).encode()


def test_drive_reports_dropouts_refusals_and_bytes_by_stage():
    parties = {1: _Party(10), 2: _Party(20), 3: _Party(30, bad_at="1"), 4: _Party(40)}
    link = InMemoryLink(parties, vanish={"first": [4]})
    out = drive(_Counter(parties, threshold=2), link)
    assert out.included == (1, 2) and out.total.tolist() == [60.0]
    assert out.dropped == {"first": (4,), "second": (3,)}
    assert out.reasons[4].startswith("dropped out at stage 'first'") and "non-number" in out.reasons[3]
    assert out.bytes_up_per_param == 4.0  # two 2-byte replies per included client, one coordinate
    assert link.gone == {3, 4}  # the driver told the link to stop carrying the refused client


def test_a_client_the_link_never_hears_from_is_dropped_by_the_driver():
    class Silent(InMemoryLink):
        def replies(self, stage: StageView):
            yield from (r for r in super().replies(stage) if r.client != 2 or r.payload is None)

    out = drive(_Counter((1, 2, 3), threshold=2), Silent({c: _Party(c) for c in (1, 2, 3)}))
    assert out.included == (1, 3) and out.reasons == {2: "no reply in stage 'first'"}


def test_the_round_fails_when_too_few_remain():
    link = InMemoryLink({1: _Party(1), 2: _Party(2)}, vanish={"first": [2]})
    with pytest.raises(NotEnoughSurvivors):
        drive(_Counter((1, 2), threshold=2), link)


def test_a_reply_nobody_awaits_is_ignored():
    class Chatty(InMemoryLink):
        def replies(self, stage: StageView):
            yield Reply(9, b"5")  # not a participant
            yield from super().replies(stage)

    out = drive(_Counter((1, 2), threshold=2), Chatty({1: _Party(1), 2: _Party(2)}))
    assert out.included == (1, 2) and out.total.tolist() == [6.0]
