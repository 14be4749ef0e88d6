"""Files a run leaves for people to load elsewhere: the metrics as CSV and the trained model
as a plain ``state_dict``.

- ``metrics.csv``: one row per round (round, accuracy, loss, epsilon, train loss, upload
  bytes, how many clients were sampled and included, why a round aborted), then one column
  per metric of the caller's ``evaluate`` hook. Counts only: who took part stays out, as in
  the redacted ``metrics.jsonl``.
- ``model.pt``: the global model's ``state_dict`` (tensors only), loadable with
  ``model.load_state_dict(torch.load("model.pt", weights_only=True))``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

METRICS_CSV = "metrics.csv"
MODEL_FILE = "model.pt"
COLUMNS = ("round", "accuracy", "loss", "epsilon", "train_loss", "bytes_up_total", "sampled", "included",
           "aborted")


def write_metrics_csv(out_dir: Path, rounds: Sequence) -> Path:
    """``metrics.csv`` from the run's :class:`~federation.engine.RoundResult` rows."""
    extra = sorted({name for r in rounds for name in r.metrics})
    path = Path(out_dir) / METRICS_CSV
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*COLUMNS, *extra])
        for r in rounds:
            sampled = r.sampled_count if r.sampled_count is not None else len(r.sampled)
            included = r.included_count if r.included_count is not None else len(r.included)
            writer.writerow([r.round, _cell(r.accuracy), _cell(r.loss), r.epsilon, _cell(r.train_loss),
                             r.bytes_up_total, sampled, included, r.aborted or "",
                             *(_cell(r.metrics.get(name)) for name in extra)])
    return path


def write_model(out_dir: Path, model: nn.Module) -> Path:
    """``model.pt``: the model's ``state_dict``, replaced atomically."""
    path = Path(out_dir) / MODEL_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path


def _cell(value: float | None) -> str | float:
    return "" if value is None else value
