"""Flower's SecAgg+ against federation.flower inside the same Flower message flow, in one run.

Writes benchmarks/results/flower_interop.json. Needs flwr 1.42 (``pip install 'secagg[flower]'``).

The same Flower app runs three times in this process: the same ``ClientApp`` (a NumPyClient
returning d parameters and a sample count), the same ``FedAvg`` and ``DefaultWorkflow``, the
same nodes, 10 % of them going offline after key sharing (they raise in ``fit``):

* ``plain``  -- Flower's default fit workflow, no mod: updates in the clear (the baseline);
* ``flower`` -- ``flwr.client.mod.secaggplus_mod`` + ``flwr.server.workflow.SecAggPlusWorkflow``;
* ``secagg`` -- ``federation.flower.secaggplus_mod`` + ``federation.flower.SecAggPlusWorkflow``.

The link is :class:`federation.flower.grid.InProcessGrid` (no Ray, no polling, no network), so
what is timed is the apps' and the protocols' own work: ``client s`` is the time spent inside
the ClientApps (all nodes, all messages; the mean per node is reported too), ``server s`` the
rest of the fit round (the workflow: planning, relaying, summing, unmasking, strategy).
``bytes up/param`` counts the bytes of every reply a node sends in the round (all stages)
per parameter. ``max err`` is the largest deviation of the released model from the plain one.

    python benchmarks/bench_flower_interop.py --nodes 100 --dim 100000 --dropout 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import flwr
import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod as flower_mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow import SecAggPlusWorkflow as FlowerWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from federation.flower import SecAggPlusWorkflow as SecaggWorkflow
from federation.flower import secaggplus_mod as secagg_mod
from federation.flower.grid import InProcessGrid

RESULTS = Path(__file__).parent / "results"


class FixedClient(NumPyClient):
    def __init__(self, pid: int, dim: int, offline: frozenset[int]) -> None:
        self.pid, self.dim, self.offline = pid, dim, offline

    def fit(self, parameters, config):
        if self.pid in self.offline:
            raise ConnectionError(f"node {self.pid} went offline after sharing its keys")
        rng = np.random.default_rng([7, self.pid])
        update = rng.uniform(-0.5, 0.5, self.dim).astype(np.float32)
        return [np.asarray(parameters[0]) + update], 50 + self.pid, {}


class CountingApp:
    """Wraps a ClientApp and counts the bytes of every reply (records and arrays)."""

    def __init__(self, app: ClientApp) -> None:
        self.app, self.bytes_up = app, 0

    def __call__(self, msg, ctxt):
        reply = self.app(msg, ctxt)
        if not reply.has_error():
            for record in reply.content.config_records.values():
                for value in record.values():
                    items = value if isinstance(value, list) else [value]
                    self.bytes_up += sum(len(v) for v in items if isinstance(v, bytes))
            for record in reply.content.array_records.values():
                self.bytes_up += sum(len(a.data) for a in record.values())
        return reply


def run(kind: str, nodes: int, dim: int, offline: frozenset[int], num_shares, threshold) -> dict:
    mods = {"plain": [], "flower": [flower_mod], "secagg": [secagg_mod]}[kind]

    def client_fn(context: Context):
        return FixedClient(int(context.node_config["partition-id"]), dim, offline).to_client()

    app = CountingApp(ClientApp(client_fn=client_fn, mods=mods))
    grid = InProcessGrid(app, nodes)
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=nodes, min_fit_clients=nodes,
                      initial_parameters=ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)]))
    workflow = {"plain": None, "flower": FlowerWorkflow(num_shares, threshold),
                "secagg": SecaggWorkflow(num_shares, threshold)}[kind]
    context = LegacyContext(context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    started = time.perf_counter()
    DefaultWorkflow(fit_workflow=workflow)(grid, context)
    wall = time.perf_counter() - started
    params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    row = {
        "kind": kind, "wall_s": wall, "client_s_total": grid.client_seconds,
        "client_s_per_node": grid.client_seconds / nodes, "server_s": wall - grid.client_seconds,
        "bytes_up_per_param": app.bytes_up / ((nodes - len(offline)) * dim),
        "model": parameters_to_ndarrays(params)[0],
    }
    if kind == "secagg":
        report = workflow.reports[0]
        row.update(included=len(report.included), threshold=report.threshold, degree=report.degree,
                   stage_s={k: round(v, 4) for k, v in report.seconds.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--dim", type=float, default=1e5)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--num-shares", type=float, default=1.0, help="fraction of nodes (1.0 = complete) or count")
    parser.add_argument("--threshold", type=float, default=0.51, help="fraction of a neighbourhood")
    parser.add_argument("--out", type=Path, default=RESULTS / "flower_interop.json")
    args = parser.parse_args()
    nodes, dim = args.nodes, int(args.dim)
    num_shares = args.num_shares if args.num_shares <= 1 else int(args.num_shares)
    n_off = round(args.dropout * nodes)
    offline = frozenset(int(i) for i in np.linspace(0, nodes - 1, n_off, dtype=int)) if n_off else frozenset()
    rows = {}
    for kind in ("plain", "secagg", "flower"):
        rows[kind] = run(kind, nodes, dim, offline, num_shares, args.threshold)
        r = rows[kind]
        print(f"{kind:7s} wall {r['wall_s']:8.2f} s  server {r['server_s']:8.2f} s  client/node "
              f"{r['client_s_per_node']:7.3f} s  up {r['bytes_up_per_param']:5.2f} B/param", flush=True)
    for kind in ("secagg", "flower"):
        rows[kind]["max_err_vs_plain"] = float(np.max(np.abs(rows[kind]["model"] - rows["plain"]["model"])))
        print(f"{kind:7s} max |model - plain model| = {rows[kind]['max_err_vs_plain']:.3g}")
    for r in rows.values():
        r.pop("model")
    ratio = {k: rows["flower"][k] / rows["secagg"][k] for k in ("wall_s", "server_s", "client_s_per_node")}
    print("flower / secagg: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    meta = {
        "nodes": nodes, "dim": dim, "offline": sorted(offline), "num_shares": num_shares, "threshold": args.threshold,
        "flwr": flwr.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(), "link": "federation.flower.grid.InProcessGrid",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "flower_over_secagg": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
