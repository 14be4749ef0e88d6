"""The ``secagg demo`` and ``secagg run`` commands, through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secagg.cli import main

ROOT = Path(__file__).resolve().parent.parent


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_hospitals_demo_masks_dp_sgd_updates_and_survives_a_dropout(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--rounds", "3", "--out", str(out), "--json"]) == 0
    events = json_lines(capsys.readouterr().out)
    rounds = [e for e in events if e["event"] == "round"]
    summary = events[-1]
    assert [r["round"] for r in rounds] == [1, 2, 3] and summary["event"] == "summary"
    # hospital 7 drops after sharing its keys in round 3; the protocol still finishes the round
    assert rounds[2]["dropped"] == {"masked_input": [7]} and 7 not in rounds[2]["included"]
    assert len(rounds[2]["included"]) == 9 and rounds[2]["aborted"] is None
    assert 0 < rounds[0]["epsilon"] < rounds[2]["epsilon"] == summary["epsilon"] <= 8.0
    assert all(r["bytes_up_total"] > 0 for r in rounds) and summary["protection"] == "masking"
    assert Path(summary["report"]).is_file() and Path(summary["ledger"]).is_file()
    assert summary["final_accuracy"] > 0.8
    # one summary schema: what --json prints is the summary.json the run wrote
    assert {k: v for k, v in summary.items() if k != "event"} == json.loads((out / "summary.json").read_text())


def test_demo_prints_a_human_summary(tmp_path, capsys):
    assert main(["demo", "--rounds", "1", "--out", str(tmp_path / "d"), "--set", "dp=none",
                 "--set", "budget_epsilon=none"]) == 0
    text = capsys.readouterr().out
    assert "round   1" in text and "What the server saw: only the sum" in text


def test_run_reads_toml_and_flags_override_it(tmp_path, capsys):
    out = tmp_path / "iot"
    code = main(["run", str(ROOT / "examples" / "iot.toml"), "--rounds", "1", "--clients", "20",
                 "--clients-per-round", "10", "--out", str(out), "--json"])
    assert code == 0
    events = json_lines(capsys.readouterr().out)
    assert events[0]["round"] == 1 and len(events[0]["sampled"]) == 10
    assert events[-1]["protection"] == "masking-sparse"
    assert (out / "config.toml").read_text().count("num_clients = 20") == 1


@pytest.mark.parametrize("argv, message", [
    (["--set", "strategy=fedsgd"], "unknown strategy"),
    (["--threshold", "11"], "threshold=11"),
    (["--budget-epsilon", "0.5"], "only 0 round(s) fit"),
    (["--scenario", "mnist", "--data-dir", "/nonexistent"], "mnist/raw/train-images-idx3-ubyte.gz"),
])
def test_bad_demo_options_fail_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    assert main(["demo", "--out", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists()


def test_demo_runs_again_in_a_new_folder_and_resumes_the_latest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--rounds", "1", "--set", "dp=none", "--set", "budget_epsilon=none", "--json"]) == 0
    first = json_lines(capsys.readouterr().out)[-1]["out_dir"]
    assert main(["demo", "--rounds", "2", "--set", "dp=none", "--set", "budget_epsilon=none", "--json",
                 "--resume"]) == 0
    resumed = json_lines(capsys.readouterr().out)
    assert [e["round"] for e in resumed if e["event"] == "round"] == [2]  # round 1 came from the checkpoint
    assert resumed[-1]["out_dir"] == first and resumed[-1]["rounds"] == 2
