"""End-to-end use of privacy/ as a federated server would: plan, reserve, noise, release, commit."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import privacy
from privacy import distributed as dd
from privacy.ledger import Ledger, Spend
from secagg.errors import PrivacyBudgetExceeded


def test_distributed_dp_rounds_with_dropouts_until_budget_refuses(tmp_path):
    dim, clip, scale, n, max_drop = 1024, 1.0, 64.0, 6, 2  # 1024: see the noise bound below
    d2 = dd.quantized_l2_sensitivity(clip_norm=clip, scale=scale, dim=dim)
    cn = dd.per_client_noise(target_std=2.0 * d2, n_clients=n, max_dropouts=max_drop)
    event = dd.distributed_event(client_noise=cn, l2_sensitivity=d2, dim=dim, clipping_norm=clip)
    assert event.noise_multiplier == pytest.approx(2.0, rel=1e-6)
    # the proven (RDP) bound of the distributed discrete Gaussian enforces the budget
    e2, e3 = (privacy.epsilon_of_events([event] * k, delta=1e-5, accountant="rdp") for k in (2, 3))
    budget = (e2 + e3) / 2  # room for two rounds, not three
    ledger = Ledger(tmp_path / "fl.sqlite", budget_epsilon=budget, delta=1e-5, accountant="rdp")
    rng = np.random.default_rng(0)  # data only; noise comes from os.urandom
    released = []
    for rnd in (1, 2, 3):
        try:
            entry = ledger.reserve(Spend(event, round=rnd, participants=n))  # before release
        except PrivacyBudgetExceeded:
            assert rnd == 3
            break
        updates = rng.normal(size=(n, dim))
        updates *= np.minimum(1.0, clip / np.linalg.norm(updates, axis=1))[:, None]
        scaled = updates * scale
        rounded = np.floor(scaled) + (rng.random(scaled.shape) < scaled - np.floor(scaled))
        survivors = list(range(n - max_drop))  # the worst case: max_drop clients dropped
        noisy = [rounded[i].astype(np.int64) + dd.sample_integer_noise(dim, cn) for i in survivors]
        total = np.sum(noisy, axis=0)  # what masked aggregation reveals
        err = total - rounded[survivors].sum(axis=0)
        # the target noise; 1024 OS-drawn coordinates: the sample std is within 20 % except with
        # probability 6e-19 (chi-square), a false-failure rate below 1e-9 (with 256 it was 6e-6)
        assert err.std() == pytest.approx(cn.aggregate_std, rel=0.2)
        released.append(total / scale)
        ledger.commit(entry, participants=len(survivors))
    rows = ledger.rows()
    assert [r.status for r in rows] == ["released", "released"]
    assert rows[-1].epsilon["rdp"] <= budget and rows[-1].epsilon["prv"] is None  # PRV has no proof
    assert rows[-1].mechanism == "distributed-dgauss" and ledger.level == "user"
    ledger.verify(recompute=True)
    ledger.close()


def test_crash_between_reserve_and_release_is_counted(tmp_path):
    path = tmp_path / "crash.sqlite"
    script = textwrap.dedent(f"""
        import os
        from privacy.events import dpfedavg_event
        from privacy.ledger import Ledger, Spend
        led = Ledger({str(path)!r}, budget_epsilon=10.0, delta=1e-5, accountant="rdp")
        led.reserve(Spend(dpfedavg_event(noise_multiplier=1.0, client_sample_rate=0.2), round=1))
        os._exit(3)  # the server dies before releasing / committing
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 3, proc.stderr
    with Ledger.open(path) as led:
        led.verify()
        (row,) = led.rows()
        assert row.status == "reserved"
        expected = privacy.epsilon(noise_multiplier=1.0, sample_rate=0.2, steps=1, delta=1e-5,
                                   accountant="rdp")
        assert led.spent()["rdp"] == pytest.approx(expected) and not math.isnan(expected)
