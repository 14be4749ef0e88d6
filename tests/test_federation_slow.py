"""Long end-to-end runs on the image datasets (``make test-slow``)."""

from __future__ import annotations

import pytest
import torch

from federation.data import default_data_dir
from federation.engine import Federation
from federation.scenarios import scenario_config

DATA = default_data_dir()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(DATA is None, reason="../shared/data (MNIST, FEMNIST) not present")]


def test_mnist_dpsgd_with_masking_learns(tmp_path):
    torch.set_num_threads(2)
    cfg = scenario_config("mnist")
    cfg.data_dir, cfg.out_dir, cfg.rounds = str(DATA), str(tmp_path / "mnist"), 3
    summary = Federation(cfg).run()
    assert summary.final_accuracy > 0.90
    assert 0 < summary.final.epsilon < cfg.budget_epsilon


def test_femnist_natural_clients_learn(tmp_path):
    torch.set_num_threads(2)
    cfg = scenario_config("femnist")
    cfg.data_dir, cfg.out_dir, cfg.rounds = str(DATA), str(tmp_path / "femnist"), 5
    summary = Federation(cfg).run()
    assert summary.final_accuracy > 0.5  # 62 classes: chance is under 6 %


def test_ray_backend_gives_the_in_process_model(tmp_path):
    import numpy as np

    ray = pytest.importorskip("ray")
    from federation.transport.ray_backend import RayAggregator, RayExecutor, start_ray

    def cfg(name):
        c = scenario_config("hospitals", dp=False)
        c.out_dir, c.rounds, c.deterministic = str(tmp_path / name), 2, True
        return c

    with pytest.warns(UserWarning, match="deterministic"):
        local = Federation(cfg("local"))
    local.run()
    started = start_ray(num_cpus=2)
    try:
        with pytest.warns(UserWarning, match="deterministic"):
            remote = Federation(cfg("ray"), executor=RayExecutor(),
                                aggregator=RayAggregator("masking", threshold=7, seed=0))
        summary = remote.run()
    finally:
        if started:
            ray.shutdown()
    assert [len(r.included) for r in summary.rounds] == [10, 10]
    np.testing.assert_allclose(remote.params, local.params, atol=1e-6)
