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
