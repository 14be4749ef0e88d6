"""Ray backend: clients as Ray actors give the same released sum as the in-process engine
(masking: bit-identical; ckks: within its error bound, bfv: bit-identical).

One local Ray (num_cpus=2) for the whole module; skipped with the reason when Ray is not
installed (`pip install 'secagg[ray]'`).
"""

from __future__ import annotations

import numpy as np
import pytest

import secagg

ray = pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'secagg[ray]')")

from federation.transport.ray_backend import run_ray_ckks_round, run_ray_round, start_ray


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
    ref = secagg.aggregate(updates, protection="masking", graph=graph, clip=50.0, seed=5, dropouts=drop_rows,
                           **({"degree": 12} if graph == "sparse" else {}))
    options = {"clip": 50.0, "graph": graph, **({"degree": 12} if graph == "sparse" else {})}  # t = 10: 3 may drop
    res = run_ray_round(
        updates, options=options, seed=5, num_actors=2,
        dropouts={stage: [r + 1 for r in rows] for stage, rows in drop_rows.items()},
    )
    assert tuple(c - 1 for c in res["outcome"].included) == ref.included
    assert {s: tuple(c - 1 for c in ids) for s, ids in res["outcome"].dropped.items()} == ref.dropped
    assert 6 not in ref.included and 2 not in ref.included and 9 in ref.included
    np.testing.assert_array_equal(res["outcome"].total, ref.total)  # bit-identical, not merely close
    np.testing.assert_allclose(res["outcome"].total, updates[list(ref.included)].sum(axis=0), atol=1e-4)


def test_ray_sparse_round_matches_in_process_with_chunked_batches(local_ray):
    """Replies come back chunk by chunk in whatever order the actors finish; the sum is the same."""
    from federation.transport.ray_backend import make_pools

    rng = np.random.default_rng(12)
    updates = rng.normal(0, 1, (24, 30))
    ref = secagg.aggregate(updates, protection="masking", graph="sparse", clip=50.0, seed=8,
                           dropouts={"masked_input": [4, 17]})
    pools = make_pools(tuple(range(1, 25)), num_actors=3, seed=8)
    res = run_ray_round(updates, options={"clip": 50.0, "graph": "sparse", "dropout": 2 / 24}, seed=8,
                        pools=pools, dropouts={"masked_input": [5, 18]})
    assert res["degree"] == ref.parameters["degree"] and res["threshold"] == ref.parameters["threshold"]
    assert tuple(c - 1 for c in res["outcome"].included) == ref.included
    np.testing.assert_array_equal(res["outcome"].total, ref.total)
    assert res["masked_input_bytes_per_param"] > 4.0  # the link counted every masked upload it moved


@pytest.mark.parametrize("scheme", ["ckks", "bfv"])
def test_ray_ckks_round_matches_in_process(local_ray, scheme):
    """CKKS/BFV with the clients and the key holder on actors, the server in this process.

    BFV is exact arithmetic modulo t on deterministically rounded inputs: the totals are
    bit-identical. CKKS decryption carries fresh encryption noise from SEAL's CSPRNG (it is
    not, and must not be, seedable), so two runs agree only within the error bound: each
    released value is within ``error_bound`` of the exact sum, and scaling the bound's z
    from its 1e-6 failure rate (over all slots) to 1e-9 over both runs gives the tolerance
    below (false-failure rate < 1e-9, tail model in secagg.ckks.roles.HeRoundConfig.error_bound).
    """
    import math

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (6, 50))
    drops = {"upload": [2]}
    ref = secagg.aggregate(x, protection="ckks", scheme=scheme, clip=10.0, dropouts=drops)
    res = run_ray_ckks_round(x, scheme=scheme, clip=10.0, dropouts=drops, num_actors=2)
    assert res.included == ref.included == (0, 1, 3, 4, 5)
    assert res.protection == "ckks" and res.parameters == ref.parameters
    exact = x[list(ref.included)].sum(axis=0)
    if scheme == "bfv":
        np.testing.assert_array_equal(res.total, ref.total)
        widen = 1.0  # the bfv bound is the rounding's own worst case, never exceeded
    else:
        z = 3 + math.log(0.014 * 50 * 1e6) / math.log(3.5)  # the bound's own z (1e-6 over all slots)
        z_test = 3 + math.log(0.014 * 50 * 2 * 1e9) / math.log(3.5)  # 1e-9 over both runs' slots
        widen = z_test / z
        np.testing.assert_array_less(np.abs(res.total - ref.total), 2 * widen * ref.max_quantization_error)
    np.testing.assert_array_less(np.abs(res.total - exact), widen * res.max_quantization_error + 1e-12)
    assert res.bytes_up_per_param == pytest.approx(ref.bytes_up_per_param, rel=0.05)


def test_serve_backend_ray_command(local_ray, tmp_path, capsys):
    import json

    from secagg.cli import main

    cfg = tmp_path / "server.toml"
    cfg.write_text(
        '[server]\ncredentials = "unused-with-ray"\nprotection = "masking"\nrounds = 2\n'
        'expected_clients = 6\nthreshold = 4\n[server.options]\ndim = 20\nclip = 100.0\n'
    )
    assert main(["serve", "--config", str(cfg), "--backend", "ray", "--clients", "8", "--seed", "3"]) == 0
    rounds = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["included"] == 8 for r in rounds)
    from federation.transport.config import synthetic_update

    expected = sum(synthetic_update(20, c, 0).astype(np.float64) for c in range(1, 9))
    assert abs(rounds[0]["norm"] - float(np.linalg.norm(expected))) < 1e-3


def test_serve_backend_ray_runs_ckks(local_ray, tmp_path, capsys):
    import json

    from secagg.cli import main

    cfg = tmp_path / "server.toml"
    cfg.write_text(
        '[server]\ncredentials = "unused-with-ray"\nprotection = "ckks"\nrounds = 1\n'
        'expected_clients = 5\nthreshold = 3\n[server.options]\ndim = 20\nclip = 5.0\n'
    )
    assert main(["serve", "--config", str(cfg), "--backend", "ray"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["round"] == 0 and line["included"] == 5
    from federation.transport.config import synthetic_update

    expected = sum(np.clip(synthetic_update(20, c, 0), -5, 5).astype(np.float64) for c in range(1, 6))
    assert abs(line["norm"] - float(np.linalg.norm(expected))) <= 20 * line["max_error"]


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


@pytest.mark.slow
def test_run_command_trains_with_ckks_on_ray(local_ray, tmp_path, capsys):
    """`secagg run --backend ray` with protection = "ckks": clients train as Ray tasks and
    their updates are summed under CKKS by parties on Ray actors (no in-process fallback)."""
    import json

    from secagg.cli import main

    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        'dataset = "breast_cancer"\nnum_clients = 5\nclients_per_round = 5\nrounds = 2\nbatch_size = 16\n'
        f'lr = 0.1\nprotection = "ckks"\nseed = 2\nout_dir = "{tmp_path / "out"}"\n'
    )
    assert main(["run", str(cfg), "--backend", "ray", "--json"]) == 0
    rounds = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"event": "round"')]
    assert len(rounds) == 2 and all(len(r["included"]) == 5 and r["aborted"] is None for r in rounds)
    assert all(r["bytes_up_per_param"] > 8 for r in rounds)  # ciphertexts, not float32 vectors


@pytest.mark.parametrize(("protection", "on_ray"), [("ckks", True), ("masking-sparse", True), ("none", False)])
def test_ray_federation_puts_the_protocol_parties_on_ray(local_ray, tmp_path, protection, on_ray):
    """What `secagg run/serve --backend ray` aggregates on Ray actors: every protocol (ckks
    included); no protection has no parties to run."""
    from federation.config import ExperimentConfig
    from federation.transport.ray_backend import RayAggregator, ray_federation

    config = ExperimentConfig.from_dict({
        "dataset": "breast_cancer", "num_clients": 4, "clients_per_round": 4, "rounds": 1,
        "protection": protection, "out_dir": str(tmp_path),
    })
    fed = ray_federation(config)
    assert isinstance(fed.aggregator, RayAggregator) is on_ray
    if on_ray:
        assert fed.aggregator.name == protection
