"""A server's progress on disk: completed rounds survive a crash, so a restart resumes after them.

``state_dir`` holds ``round-N.npy`` (each released aggregate), ``rounds.jsonl`` (one summary
line per round, failed ones included) and ``progress.json`` (the last completed round),
written in that order and atomically, so a server killed at any point restarts at the first
round it had not finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from secagg.errors import ConfigError


def read_progress(state_dir: Path | None) -> int:
    """Number of the last round the server completed (-1 if none)."""
    if state_dir is None or not (state_dir / "progress.json").is_file():
        return -1
    try:
        return int(json.loads((state_dir / "progress.json").read_text())["completed"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{state_dir / 'progress.json'} is corrupt; inspect it or start a fresh state_dir") from None


def record_round(state_dir: Path, number: int, total: np.ndarray, summary: dict) -> None:
    """Persist a completed round atomically: aggregate, summary, then the progress marker."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".round-{number}.npy"
    with tmp.open("wb") as f:
        np.save(f, total, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / f"round-{number}.npy")
    with (state_dir / "rounds.jsonl").open("a") as f:
        f.write(json.dumps(summary) + "\n")
    tmp = state_dir / ".progress.json"
    tmp.write_text(json.dumps({"completed": number}))
    os.replace(tmp, state_dir / "progress.json")


def record_failed_round(state_dir: Path, summary: dict) -> None:
    """Log a failed round in rounds.jsonl with its reason (no aggregate, and the progress marker does not move)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "rounds.jsonl").open("a") as f:
        f.write(json.dumps(summary) + "\n")
        f.flush()
        os.fsync(f.fileno())
