"""Client sampling that backs the ledger's amplification claim (user-level DP).

The ledger may claim amplification by sampling (q < 1) only if nobody can predict or learn who
was sampled: the sample is drawn from the operating system at round time, not from the public
seed, and shared files carry counts, not identities. Over gRPC every connected client takes
part, so the ledger must record q = 1.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from federation.config import ExperimentConfig
from federation.engine import Federation
from privacy.dpfedavg import fixed_sample, poisson_sample
from privacy.ledger import Ledger

torch.set_num_threads(1)


def user_config(tmp_path, name="run", **options) -> ExperimentConfig:
    base = dict(dataset="breast_cancer", num_clients=6, rounds=2, batch_size=16, lr=0.1,
                protection="none", dp="user", sampling="poisson", sampling_rate=0.5,
                noise_multiplier=1.0, update_clip=1.0, budget_epsilon=100.0, accountant="rdp",
                out_dir=str(tmp_path / name))
    base.update(options)
    return ExperimentConfig.from_dict(base)


def hoeffding(n: int) -> float:
    """Half-width t with P(|mean - q| >= t) <= 2 exp(-2 n t^2) = 1e-9 (false-failure rate)."""
    return math.sqrt(math.log(2e9) / (2 * n))


def test_ledger_sample_rate_matches_the_empirical_selection(tmp_path):
    fed = Federation(user_config(tmp_path))
    q = fed.accountant.round_event().sample_rate
    assert q == 0.5
    rounds = 1000
    picks = np.zeros(6)
    for r in range(1, rounds + 1):
        for c in fed.sample_clients(r):
            picks[c] += 1
    # every client independently: each one's frequency is within the Hoeffding bound of the
    # ledger's q (false-failure rate < 6 x 1e-9 over the six clients)
    assert np.all(np.abs(picks / rounds - q) < hoeffding(rounds))


def test_two_federations_from_one_config_draw_different_cohorts(tmp_path):
    """Before: the cohort followed from the config's seed, so anyone with the config knew it."""
    a = Federation(user_config(tmp_path, "a"))
    b = Federation(user_config(tmp_path, "b"))
    # identical over 40 rounds of 6 clients at q = 1/2 with probability 2^-240
    assert [a.sample_clients(r) for r in range(1, 41)] != [b.sample_clients(r) for r in range(1, 41)]


def test_csprng_samplers_are_uniform():
    n = 20000
    hits = sum(len(poisson_sample(5, 0.2)) for _ in range(n // 5))
    assert abs(hits / n - 0.2) < hoeffding(n)  # false-failure rate < 1e-9
    counts = np.zeros(10)
    for _ in range(n // 3):
        s = fixed_sample(10, 3)
        assert len(set(s)) == 3 and s == sorted(s)
        counts[s] += 1
    # each client's inclusion is a Bernoulli(0.3) per draw
    assert np.all(np.abs(counts / (n // 3) - 0.3) < hoeffding(n // 3))


def test_shared_files_hold_counts_not_who_was_sampled(tmp_path):
    fed = Federation(user_config(tmp_path, rounds=1))
    summary = fed.run()
    assert all(r.sampled_count is None for r in summary.rounds)  # in memory: the identities
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    for line, r in zip(lines, summary.rounds):
        assert line["sampled"] == [] and line["included"] == [] and line["dropped"] == {}
        assert line["sampled_count"] == len(r.sampled)
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert all(m["sampled"] == [] for m in ckpt["metrics"])
    with Ledger.open(out / "ledger.db", key=fed.ledger_key()) as ledger:
        assert {e.sample_rate for e in ledger.rows()} == {0.5}


def test_fixed_cohorts_claim_no_amplification_and_keep_identities(tmp_path):
    fed = Federation(user_config(tmp_path, sampling="fixed", clients_per_round=3))
    assert fed.accountant.round_event().sample_rate == 1.0
    assert not fed.redact_cohorts


def test_grpc_training_records_q_one(tmp_path, pki):
    """Before: every connected client joined every round, but the ledger recorded the configured q."""
    from federation.transport.certs import Credentials
    from federation.transport.grpc_server import ServerSettings
    from federation.transport.training import GrpcFederation

    bundle = pki / "ca" / "server"
    cfg = user_config(tmp_path, sampling="poisson", sampling_rate=0.2, num_clients=3, rounds=2,
                      budget_epsilon=50.0)
    fed = GrpcFederation(cfg, ServerSettings(expected_clients=3, threshold=2), Credentials.load(bundle))
    try:
        assert fed.accountant.round_event().sample_rate == 1.0
        assert not fed.redact_cohorts
        # 2 rounds at z = 1 without amplification (the 6.58 is at delta 1e-5, PRV)
        assert fed.accountant.epsilon_after(2) > 6.0
    finally:
        fed.close()
