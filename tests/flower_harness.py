"""A Flower app with DP-SGD clients, run plain or through federation.flower, in process or simulated.

:class:`InProcessGrid` is a Flower ``Grid`` that hands every message to its node's
``ClientApp`` in this process, one after another, with one ``Context`` per node kept
between messages, and turns an exception in the app into an error reply -- what Flower's
simulation engine does, without Ray or polling, so a many-node test stays fast.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp.grid import Grid

from federation.flower.grid import InProcessGrid

FEATURES, CLASSES = 8, 2
# DP-SGD settings of the torch clients (federation.training.LocalTraining; imported lazily so the
# torch-free tests do not pay for torch and Opacus).
LOCAL = {"epochs": 1, "batch_size": 16, "lr": 0.2, "dp_sgd": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0,
         "secure_noise": False}  # tests only: DP noise and Poisson batches from the seed, so two runs match


def _build():
    from federation.models import build_model

    return build_model("logreg", (FEATURES,), CLASSES)


def partition(pid: int) -> tuple[np.ndarray, np.ndarray]:
    """Node ``pid``'s synthetic records (sizes differ, so the weighting matters)."""
    rng = np.random.default_rng([2026, pid])
    n = 30 + 9 * pid
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * pid > 0.2).astype(np.int64)
    return x, y


def initial_parameters(kind: str = "dpsgd") -> list[np.ndarray]:
    if kind != "dpsgd":
        return [np.zeros(FEATURES, dtype=np.float32)]
    import torch

    from federation.models import get_flat

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return [get_flat(_build())]


class DPClient(NumPyClient):
    """DP-SGD (Opacus) on the node's partition; seeds fixed so two runs train identically."""

    def __init__(self, pid: int, drop: frozenset[tuple[int, int]]) -> None:
        self.pid, self.drop = pid, drop
        self.x, self.y = partition(pid)

    def fit(self, parameters, config):
        rnd = int(config["server_round"])
        if (rnd, self.pid) in self.drop:
            raise ConnectionError(f"node {self.pid} went offline in round {rnd}")
        from federation.flower import dp_metrics
        from federation.training import LocalTraining, train_client

        flat = np.asarray(parameters[0], dtype=np.float32)
        # Tests only: DP noise from a fixed seed, so the plain and the secure run are comparable.
        upd = train_client(_build, flat, self.x, self.y, LocalTraining(**LOCAL), client=self.pid,
                           seed=1000 * rnd + self.pid)
        metrics = dp_metrics(noise_multiplier=LOCAL["noise_multiplier"], sample_rate=upd.sample_rate,
                             steps=upd.steps, max_grad_norm=LOCAL["max_grad_norm"])
        return [flat + upd.delta], len(self.y), metrics


class LeastSquaresClient(NumPyClient):
    """A torch-free client for fast tests: a few full-batch gradient steps of least squares.

    It reports ``claimed`` DP-SGD metrics (it runs no DP-SGD itself): enough to exercise
    the mod's check of the ledger's spend without Opacus.
    """

    def __init__(self, pid: int, drop: frozenset[tuple[int, int]], claimed: dict[str, float]) -> None:
        self.pid, self.drop, self.claimed = pid, drop, claimed
        x, y = partition(pid)
        self.x, self.y = x.astype(np.float64), y.astype(np.float64)

    def fit(self, parameters, config):
        rnd = int(config["server_round"])
        if (rnd, self.pid) in self.drop:
            raise ConnectionError(f"node {self.pid} went offline in round {rnd}")
        w = np.asarray(parameters[0], dtype=np.float64)
        for _ in range(3):
            w = w - 0.1 * self.x.T @ (self.x @ w - self.y) / len(self.y)
        return [w.astype(np.float32)], len(self.y), dict(self.claimed)


def client_app(*, secure: bool, drop: Iterable[tuple[int, int]] = (), mod=None, kind: str = "dpsgd",
               claimed: dict[str, float] | None = None) -> ClientApp:
    dropping = frozenset(drop)

    def client_fn(context: Context):
        pid = int(context.node_config["partition-id"])
        if kind == "dpsgd":
            return DPClient(pid, dropping).to_client()
        return LeastSquaresClient(pid, dropping, claimed or {}).to_client()

    if not secure:
        return ClientApp(client_fn=client_fn)
    if mod is None:
        from federation.flower import secaggplus_mod as mod
    return ClientApp(client_fn=client_fn, mods=[mod])


def strategy(num_nodes: int, kind: str = "dpsgd") -> FedAvg:
    return FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=num_nodes,
                  min_fit_clients=num_nodes, initial_parameters=ndarrays_to_parameters(initial_parameters(kind)),
                  on_fit_config_fn=lambda rnd: {"server_round": rnd})


def run_server(grid: Grid, context: Context, *, rounds: int, num_nodes: int, fit_workflow=None,
               kind: str = "dpsgd") -> list[np.ndarray]:
    """The ServerApp's main: a legacy Flower server loop; returns the final global parameters."""
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                           strategy=strategy(num_nodes, kind))
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    params = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return parameters_to_ndarrays(params)


def server_app(*, rounds: int, num_nodes: int, fit_workflow, out: dict, kind: str = "dpsgd") -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        out["parameters"] = run_server(grid, context, rounds=rounds, num_nodes=num_nodes, fit_workflow=fit_workflow,
                                       kind=kind)

    return app


def run_in_process(*, secure: bool, num_nodes: int, rounds: int, fit_workflow=None, drop=(), mod=None,
                   kind: str = "dpsgd", claimed: dict[str, float] | None = None, node_config=None):
    grid = InProcessGrid(client_app(secure=secure, drop=drop, mod=mod, kind=kind, claimed=claimed), num_nodes,
                         node_config=node_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    params = run_server(grid, context, rounds=rounds, num_nodes=num_nodes, fit_workflow=fit_workflow, kind=kind)
    return params, grid
