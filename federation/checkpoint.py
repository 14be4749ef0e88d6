"""Checkpoints after every round, in a format that never unpickles anything.

Two files in the output folder, each replaced atomically (write to a temporary name, fsync,
``os.replace``), the JSON last so that it always points at a complete tensor file:

- ``checkpoint.pt``: plain tensors only (global parameters, server optimizer state),
  written with ``torch.save`` and read back with ``torch.load(weights_only=True)``;
- ``checkpoint.json``: the completed round, the config fingerprint, the public seed from which
  public randomness is derived, the torch RNG state, the metrics so far and, for a private
  run, the privacy ledger's head when the checkpoint was written (``ledger_head``: genesis,
  count, hash) -- a resumed run refuses a missing ledger or any other ledger than this one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from secagg.errors import ConfigError

WEIGHTS = "checkpoint.pt"
META = "checkpoint.json"
FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    params: np.ndarray
    strategy_state: dict[str, np.ndarray]
    fingerprint: str
    seed: int
    metrics: list[dict]
    torch_rng_state: list[int] | None = None
    ledger_head: dict | None = None  # {"genesis": ..., "count": n, "hash": ...} of a private run


def save(folder: str | Path, ckpt: Checkpoint) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"params": torch.as_tensor(ckpt.params)}
    tensors.update({f"strategy.{k}": torch.as_tensor(v) for k, v in ckpt.strategy_state.items()})
    _atomic(folder / WEIGHTS, lambda fh: torch.save(tensors, fh))
    meta = {"format": FORMAT, "round": ckpt.round, "fingerprint": ckpt.fingerprint, "seed": ckpt.seed,
            "metrics": ckpt.metrics, "torch_rng_state": ckpt.torch_rng_state,
            "ledger_head": ckpt.ledger_head}
    _atomic(folder / META, lambda fh: fh.write(json.dumps(meta).encode()))


def load(folder: str | Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None if there is none."""
    folder = Path(folder)
    if not (folder / META).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{folder / META}: checkpoint format {meta.get('format')} is not {FORMAT}")
    tensors = torch.load(folder / WEIGHTS, weights_only=True, map_location="cpu")
    if not isinstance(tensors, dict) or "params" not in tensors:
        raise ConfigError(f"{folder / WEIGHTS} holds no 'params' tensor")
    state = {k.split(".", 1)[1]: v.numpy() for k, v in tensors.items() if k.startswith("strategy.")}
    return Checkpoint(
        round=int(meta["round"]), params=tensors["params"].numpy(), strategy_state=state,
        fingerprint=meta["fingerprint"], seed=int(meta["seed"]), metrics=list(meta["metrics"]),
        torch_rng_state=meta.get("torch_rng_state"), ledger_head=meta.get("ledger_head"),
    )


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
