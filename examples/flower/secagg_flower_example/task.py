"""Model, data and DP-SGD training shared by the ClientApp and the ServerApp."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import tomli  # a Flower dependency; tomllib from Python 3.11 on
import torch

from federation.data import load_dataset, partition
from federation.models import build_model, get_flat, set_flat
from federation.training import LocalTraining, evaluate, train_client

# The run config of pyproject.toml; `flwr run` passes it (with --run-config overrides) in
# context.run_config, run_simulation passes none, so these are the defaults.
DEFAULTS = tomli.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def settings(run_config) -> dict:
    return {**DEFAULTS, **dict(run_config)}


DATASET = load_dataset("breast_cancer", seed=0)  # bundled with scikit-learn: no download
build = partial(build_model, "mlp", DATASET.input_shape, DATASET.num_classes, hidden=16)


def partition_of(pid: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Hospital ``pid``'s patients (an IID split of the training set, the same on every host)."""
    parts = partition(DATASET, num_clients=num_partitions, scheme="iid", seed=0)
    idx = parts[pid]
    return DATASET.x_train[idx], DATASET.y_train[idx]


def partition_sizes(num_partitions: int) -> list[int]:
    return [len(p) for p in partition(DATASET, num_clients=num_partitions, scheme="iid", seed=0)]


def initial_arrays() -> list[np.ndarray]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return to_arrays(get_flat(build()))


def to_arrays(flat: np.ndarray) -> list[np.ndarray]:
    """A flat parameter vector as one array per layer (what Flower carries)."""
    model = build()
    set_flat(model, flat)
    return [p.detach().numpy().copy() for p in model.parameters()]


def to_flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def local_training(run_config) -> LocalTraining:
    return LocalTraining(
        epochs=int(run_config["local-epochs"]), batch_size=int(run_config["batch-size"]), lr=float(run_config["lr"]),
        dp_sgd=True, noise_multiplier=float(run_config["noise-multiplier"]),
        max_grad_norm=float(run_config["max-grad-norm"]),
    )


def dp_sgd(arrays: list[np.ndarray], x: np.ndarray, y: np.ndarray, local: LocalTraining, pid: int):
    """One round of DP-SGD (Opacus, Poisson sampling, per-example clipping) from the global model."""
    flat = to_flat(arrays)
    update = train_client(build, flat, x, y, local, client=pid)
    return to_arrays(flat + update.delta), update


def worst_case_spend(run_config) -> tuple[float, int]:
    """(sampling rate, steps) of the hospital that spends most per round: the smallest one."""
    batch, epochs = int(run_config["batch-size"]), int(run_config["local-epochs"])
    smallest = min(partition_sizes(int(run_config["num-partitions"])))
    return min(1.0, batch / smallest), epochs * math.ceil(smallest / batch)


def accuracy(arrays: list[np.ndarray]) -> tuple[float, float]:
    model = build()
    set_flat(model, to_flat(arrays))
    return evaluate(model, DATASET.x_test, DATASET.y_test)
