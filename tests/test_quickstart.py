"""docs/quickstart.md, run as written: the caller's own model and data through public names only.

The script trains an MLP on scikit-learn's wine data at 5 sites with DP-SGD, masking, one
site dropping in round 2 and the privacy ledger; the test checks what it left behind.
"""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")
pytest.importorskip("sklearn")

from tests.test_docs import blocks, run_block

QUICKSTART = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"


def test_the_quickstart_script_runs_as_documented(tmp_path, monkeypatch, capsys):
    script = blocks(QUICKSTART)[0].code
    code_lines = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code_lines) <= 30, "the quickstart promises a model in 30 lines"
    assert "._" not in script  # public names only
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(script, str(QUICKSTART), "exec"), namespace)
    summary = namespace["summary"]
    out = tmp_path / "out" / "quickstart"

    assert summary.final_accuracy > 0.8  # 3 classes: chance is 1/3
    assert len(summary.rounds) == 5 and all(r.aborted is None for r in summary.rounds)
    assert 3 not in summary.rounds[1].included and summary.rounds[1].dropped == {"masked_input": [3]}
    assert all(len(r.included) == 5 for i, r in enumerate(summary.rounds) if i != 1)
    assert 0 < summary.final.epsilon <= 12.0
    assert "accuracy" in capsys.readouterr().out

    recorded = tomllib.loads((out / "config.toml").read_text())
    assert recorded["model"]["model"] == "custom: __main__:make_model"
    assert recorded["data"]["dataset"] == "custom: 5 sites, 133 records"
    assert recorded["data"]["num_clients"] == 5 and recorded["privacy"]["dp"] == "dpsgd"
    assert "partition" not in recorded["data"] and "hidden" not in recorded["model"]  # not used

    from privacy.ledger import Ledger

    with Ledger.open(out / "ledger.db", key=(out / "ledger.key").read_bytes()) as ledger:  # keyed by default
        assert [r.round for r in ledger.rows()] == [1, 2, 3, 4, 5]
        assert all(r.status == "released" for r in ledger.rows())
        ledger.verify()
    assert (out / "privacy_report.html").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    with open(out / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in table] == [1, 2, 3, 4, 5] and table[1]["included"] == "4"
    assert float(table[-1]["accuracy"]) == pytest.approx(summary.final_accuracy)
    # the trained model, as a plain state_dict of the caller's own model
    model = namespace["make_model"]()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    fed = namespace["fed"]
    for a, b in zip(model.parameters(), fed.global_model().parameters()):
        assert torch.equal(a, b)


def test_the_other_quickstart_blocks_run(tmp_path, monkeypatch):
    """Every later block of the page (own training step and metrics, ...), in order."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__main__"}
    later = blocks(QUICKSTART)[1:]
    assert later and all(b.not_run is None for b in later)
    for block in later:
        run_block(block, namespace)
    assert namespace["summary"].rounds[-1].metrics["weight_error"] < 0.2
