"""Ray backend: clients as Ray actors give the same released sum as the in-process engine.

One local Ray (num_cpus=2) for the whole module; skipped with the reason when Ray is not
installed (`pip install 'secagg[ray]'`).
"""

from __future__ import annotations

import numpy as np
import pytest

import secagg

ray = pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'secagg[ray]')")

from federation.transport.ray_backend import run_ray_round, start_ray


@pytest.fixture(scope="module")
def local_ray():
    started = start_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_ray_actors_match_in_process_engine_on_same_seed(local_ray, graph):
    rng = np.random.default_rng(11)
    updates = rng.normal(0, 1, (16, 40))
    drop_rows = {"advertise": [6], "masked_input": [2], "unmask": [9]}  # 0-based rows
    ref = secagg.aggregate(updates, protocol="masking", graph=graph, clip=50.0, seed=5, dropouts=drop_rows,
                           **({"degree": 12} if graph == "sparse" else {}))
    options = {"clip": 50.0, "graph": graph, **({"degree": 12} if graph == "sparse" else {})}  # t = 10: 3 may drop
    res = run_ray_round(
        updates, options=options, seed=5, num_actors=2,
        dropouts={stage: [r + 1 for r in rows] for stage, rows in drop_rows.items()},
    )
    assert tuple(c - 1 for c in res["included"]) == ref.included
    assert 6 not in ref.included and 2 not in ref.included and 9 in ref.included
    np.testing.assert_array_equal(res["total"], ref.total)  # bit-identical, not merely close
    np.testing.assert_allclose(res["total"], updates[list(ref.included)].sum(axis=0), atol=1e-4)


def test_serve_backend_ray_command(local_ray, tmp_path, capsys):
    import json

    from secagg.cli import main

    cfg = tmp_path / "server.toml"
    cfg.write_text(
        '[server]\ncredentials = "unused-with-ray"\nmode = "masking"\nrounds = 2\n'
        'expected_clients = 6\nthreshold = 4\n[server.options]\ndim = 20\nclip = 100.0\n'
    )
    assert main(["serve", "--config", str(cfg), "--backend", "ray", "--clients", "8", "--seed", "3"]) == 0
    rounds = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["included"] == 8 for r in rounds)
    from federation.transport.config import synthetic_update

    expected = sum(synthetic_update(20, c, 0).astype(np.float64) for c in range(1, 9))
    assert abs(rounds[0]["norm"] - float(np.linalg.norm(expected))) < 1e-3


@pytest.mark.slow
def test_federation_engine_with_ray_training_and_aggregation(local_ray, tmp_path):
    """A training run with clients trained as Ray tasks and aggregated by Ray actors
    ends with exactly the model of the in-process engine (deterministic seeds)."""
    from federation.config import ExperimentConfig
    from federation.engine import Federation
    from federation.transport.ray_backend import RayAggregator, RayExecutor

    def cfg(name):
        return ExperimentConfig.from_dict({
            "dataset": "breast_cancer", "num_clients": 6, "clients_per_round": 6, "rounds": 2,
            "batch_size": 16, "lr": 0.1, "protection": "masking", "deterministic": True, "seed": 4,
            "out_dir": str(tmp_path / name),
            "dropout_schedule": [{"round": 2, "stage": "masked_input", "clients": [1]}],
        })

    with pytest.warns(UserWarning, match="deterministic"):
        local = Federation(cfg("local"))
    local_summary = local.run()
    with pytest.warns(UserWarning, match="deterministic"):
        remote = Federation(cfg("ray"), executor=RayExecutor(),
                            aggregator=RayAggregator("masking", seed=4))
    remote_summary = remote.run()
    assert [r.included for r in remote_summary.rounds] == [r.included for r in local_summary.rounds]
    np.testing.assert_array_equal(remote.params, local.params)
