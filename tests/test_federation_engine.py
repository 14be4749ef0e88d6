"""End-to-end behaviour of the federation engine on the bundled breast cancer data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from federation.aggregators import protocol_available
from federation.config import ExperimentConfig
from federation.engine import Federation
from federation.models import set_flat
from federation.training import train_client
from secagg.errors import ConfigError, DataError, PrivacyBudgetExceeded

torch.set_num_threads(1)

CKKS_MISSING = protocol_available("ckks")


def config(tmp_path, name="run", **options) -> ExperimentConfig:
    base = dict(dataset="breast_cancer", num_clients=6, clients_per_round=6, rounds=2, batch_size=16,
                lr=0.1, protection="none", out_dir=str(tmp_path / name))
    base.update(options)
    return ExperimentConfig.from_dict(base)


def run(cfg: ExperimentConfig, **kwargs):
    fed = Federation(cfg)
    return fed, fed.run(**kwargs)


# ------------------------------------------------------------------ equivalence with plain FedAvg

DROPS = [{"round": 2, "stage": "masked_input", "clients": [1]}, {"round": 2, "stage": "unmask", "clients": [4]}]


@pytest.mark.parametrize("protection", ["masking", "masking-sparse"])
def test_masking_gives_the_plain_fedavg_model(tmp_path, protection):
    plain, plain_summary = run(config(tmp_path, "plain", rounds=3, dropout_schedule=DROPS))
    masked, masked_summary = run(config(tmp_path, protection, rounds=3, protection=protection,
                                        dropout_schedule=DROPS))
    for a, b in zip(plain_summary.rounds, masked_summary.rounds):
        assert a.included == b.included
    # client 1 dropped before uploading: left out; client 4 dropped after uploading: counted
    assert 1 not in masked_summary.rounds[1].included and 4 in masked_summary.rounds[1].included
    bound = max(r.max_quantization_error for r in masked_summary.rounds)
    assert 0 < bound < 1e-4
    # per-round error bound of the sum, amplified by at most 1/weight through 3 rounds of training
    assert np.max(np.abs(plain.params - masked.params)) < 1e-3
    assert plain_summary.final_accuracy == pytest.approx(masked_summary.final_accuracy, abs=0.01)


@pytest.mark.skipif(CKKS_MISSING is not None, reason=f"CKKS backend not available: {CKKS_MISSING}")
def test_ckks_gives_the_plain_fedavg_model(tmp_path):
    plain, _ = run(config(tmp_path, "plain", rounds=3))
    ckks, summary = run(config(tmp_path, "ckks", rounds=3, protection="ckks"))
    assert all(r.bytes_up_per_param > 4 for r in summary.rounds)  # ciphertexts are bigger than floats
    assert np.max(np.abs(plain.params - ckks.params)) < 1e-3


def test_weighted_fedavg_matches_a_hand_computed_round(tmp_path):
    cfg = config(tmp_path, rounds=1, partition="dirichlet", alpha=1.0, update_clip=0.0)
    fed = Federation(cfg)
    start = fed.params.copy()
    sampled = fed.sample_clients(1)
    deltas, sizes = [], []
    for client in sampled:
        idx = fed.parts[client]
        seed = int(np.random.SeedSequence([cfg.seed, 1, 3, client]).generate_state(1)[0])
        u = train_client(fed.build, start, fed.dataset.x_train[idx], fed.dataset.y_train[idx], fed.local,
                         client=client, seed=seed)
        deltas.append(u.delta.astype(np.float64))
        sizes.append(len(idx))
    assert len(set(sizes)) > 1  # the test means something only with unequal clients
    expected = start + np.average(deltas, axis=0, weights=sizes)
    fed.run()
    np.testing.assert_allclose(fed.params, expected, rtol=0, atol=1e-6)


def test_training_improves_accuracy_over_the_initial_model(tmp_path):
    fed = Federation(config(tmp_path, rounds=3))
    before, _ = fed.evaluate()
    summary = fed.run()
    assert summary.final_accuracy > max(before, 0.85)


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi"])
def test_other_strategies_train(tmp_path, strategy):
    options = {"proximal_mu": 0.1} if strategy == "fedprox" else {"server_lr": 0.05}
    _, summary = run(config(tmp_path, rounds=3, strategy=strategy, **options))
    assert summary.final_accuracy > 0.85


def test_fedprox_pulls_clients_towards_the_global_model(tmp_path):
    plain = Federation(config(tmp_path, "a", local_epochs=3))
    prox = Federation(config(tmp_path, "b", local_epochs=3, strategy="fedprox", proximal_mu=5.0))
    sampled = plain.sample_clients(1)
    norm = lambda fed: sum(np.linalg.norm(u.delta) for u in fed.train_clients(1, sampled, {}))
    assert norm(prox) < norm(plain)


# ------------------------------------------------------------------ faults

def test_random_dropouts_and_stragglers_are_handled_by_the_protocol(tmp_path):
    _, summary = run(config(tmp_path, rounds=3, num_clients=8, clients_per_round=8, protection="masking",
                            dropout_rate=0.15, straggler_rate=0.1, seed=3))
    dropped = [c for r in summary.rounds for cs in r.dropped.values() for c in cs]
    assert dropped, "with these rates some client must drop in 3 rounds of 8"
    for r in summary.rounds:
        gone = {c for s in ("advertise", "share", "masked_input") for c in r.dropped.get(s, [])}
        assert set(r.included) == set(r.sampled) - gone
        assert r.aborted is None


def test_poisson_sampling_varies_the_cohort(tmp_path):
    fed = Federation(config(tmp_path, num_clients=10, sampling="poisson", sampling_rate=0.5))
    sizes = {len(fed.sample_clients(r)) for r in range(1, 20)}
    assert len(sizes) > 2


# ------------------------------------------------------------------ DP, ledger, resume

def test_dpsgd_run_accounts_every_round_in_the_ledger(tmp_path):
    from privacy.ledger import Ledger

    fed, summary = run(config(tmp_path, rounds=2, dp="dpsgd", noise_multiplier=1.5, budget_epsilon=20.0,
                              accountant="rdp"))
    eps = [r.epsilon for r in summary.rounds]
    assert 0 < eps[0] < eps[1] <= 20.0
    assert eps[1] == pytest.approx(fed.accountant.epsilon_after(2), rel=1e-9)
    with Ledger.open(tmp_path / "run" / "ledger.db", key=fed.ledger_key()) as ledger:
        rows = ledger.rows()
        assert [e.round for e in rows] == [1, 2] and {e.status for e in rows} == {"released"}
        ledger.verify(recompute=True)
    report = (tmp_path / "run" / "privacy_report.html").read_text()
    assert f"{eps[1]:.4f}"[:5] in report and "<html" in report


def test_budget_too_small_is_refused_before_any_training(tmp_path):
    cfg = config(tmp_path, rounds=50, dp="dpsgd", noise_multiplier=0.8, budget_epsilon=1.0, accountant="rdp")
    with pytest.raises(PrivacyBudgetExceeded, match="round"):
        Federation(cfg)
    assert not (tmp_path / "run").exists()


def test_resume_continues_to_the_same_model_without_re_spending(tmp_path):
    from privacy.ledger import Ledger

    opts = dict(rounds=3, dp="dpsgd", noise_multiplier=1.5, budget_epsilon=30.0, accountant="rdp",
                deterministic=True)
    with pytest.warns(UserWarning, match="deterministic"):
        whole, _ = run(config(tmp_path, "whole", **opts))
    # "crash" after round 2: run 2 rounds, then reserve round 3 and stop before training it
    with pytest.warns(UserWarning, match="deterministic"):
        run(config(tmp_path, "crashed", **{**opts, "rounds": 2}))
    with pytest.warns(UserWarning, match="deterministic"):
        crashed = Federation(config(tmp_path, "crashed", **opts))
    with Ledger(tmp_path / "crashed" / "ledger.db", budget_epsilon=30.0, delta=1e-5,
                accountant="rdp", key=crashed.ledger_key()) as ledger:
        crashed.reserve_budget(ledger, 3, 6)
        assert len(ledger.rows()) == 3
    with pytest.raises(ConfigError, match="--resume"):
        crashed.run()
    summary = crashed.run(resume=True)
    assert summary.resumed_from == 2 and [r.round for r in summary.rounds] == [1, 2, 3]
    np.testing.assert_array_equal(crashed.params, whole.params)
    with Ledger.open(tmp_path / "crashed" / "ledger.db", key=crashed.ledger_key()) as ledger:
        rows = ledger.rows()
    # one reservation per release: the crashed run's open reservation is closed (and still
    # counts: a crash may follow the release), the re-run is reserved anew. (This test used to
    # assert that round 3 re-ran under the crashed run's reservation.)
    assert [e.round for e in rows] == [1, 2, 3, 3]
    assert [e.status for e in rows] == ["released", "released", "aborted", "released"]
    assert rows[-1].epsilon["rdp"] == pytest.approx(summary.rounds[-1].epsilon)


def test_a_round_committed_before_the_crash_is_counted_again_when_rerun(tmp_path):
    """Crash after the release was committed but before the checkpoint: the re-run is a second release."""
    from privacy.ledger import Ledger

    opts = dict(rounds=2, dp="dpsgd", noise_multiplier=1.5, budget_epsilon=30.0, accountant="rdp")
    run(config(tmp_path, "crashed", **{**opts, "rounds": 1}))
    fed = Federation(config(tmp_path, "crashed", **opts))
    with Ledger(tmp_path / "crashed" / "ledger.db", budget_epsilon=30.0, delta=1e-5, accountant="rdp",
                key=fed.ledger_key()) as ledger:
        entry, _ = fed.reserve_budget(ledger, 2, 6)
        ledger.commit(entry, participants=6)  # released, then the process died before checkpointing
    summary = fed.run(resume=True)
    assert [r.round for r in summary.rounds][-1] == 2
    with Ledger.open(tmp_path / "crashed" / "ledger.db", key=fed.ledger_key()) as ledger:
        rows = ledger.rows()
    assert [e.round for e in rows] == [1, 2, 2]  # the lost release and the re-run both count
    assert [e.status for e in rows] == ["released", "released", "released"]
    assert rows[-1].epsilon["rdp"] > rows[-2].epsilon["rdp"]


def test_checkpoint_loads_with_weights_only(tmp_path):
    fed, _ = run(config(tmp_path, rounds=1, strategy="fedadam"))
    tensors = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    np.testing.assert_array_equal(tensors["params"].numpy(), fed.params)
    assert set(tensors) == {"params", "strategy.m", "strategy.v"}
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["round"] == 1 and meta["fingerprint"] == fed.config.fingerprint()


def test_resume_with_a_different_config_is_refused(tmp_path):
    run(config(tmp_path, rounds=1))
    with pytest.raises(ConfigError, match="different configuration"):
        Federation(config(tmp_path, rounds=2, lr=0.3)).run(resume=True)


# ------------------------------------------------------------------ bad configs fail early

@pytest.mark.parametrize("options, match", [
    ({"strategy": "fedsgd"}, "unknown strategy"),
    ({"protection": "masking", "threshold": 7}, "threshold=7"),
    ({"dp": "dpsgd"}, "needs budget_epsilon"),
    ({"proximal_mu": 0.1}, "fedprox"),
    ({"clients_per_round": 9}, "clients_per_round"),
])
def test_bad_configs_fail_before_training(tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        Federation(config(tmp_path, **options))
    assert not (tmp_path / "run").exists()


def test_missing_data_dir_names_the_expected_files(tmp_path):
    with pytest.raises(DataError, match="mnist/raw/train-images-idx3-ubyte.gz"):
        Federation(config(tmp_path, dataset="mnist", model="cnn", data_dir=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="--data-dir"):
        Federation(config(tmp_path, dataset="finance", data_dir=None))


def test_evaluate_uses_the_global_parameters(tmp_path):
    fed = Federation(config(tmp_path))
    model = fed.build()
    set_flat(model, fed.params)
    from federation.training import evaluate

    assert evaluate(model, fed.dataset.x_test, fed.dataset.y_test) == fed.evaluate()


# ------------------------------------------------------------------ user-level DP

def user_dp_config(tmp_path, dp, **options):
    return config(tmp_path, dp, dataset="digits", num_clients=24, clients_per_round=12, protection="masking",
                  threshold=8, dp=dp, noise_multiplier=1.0, budget_epsilon=100.0, update_clip=1.0,
                  accountant="rdp", **options)


def test_distributed_noise_shares_sum_to_the_planned_noise(tmp_path):
    fed = Federation(user_dp_config(tmp_path, "user-distributed"))
    sampled = fed.sample_clients(1)
    vectors, clip = fed.encode_updates(fed.train_clients(1, sampled, {}))
    assert np.all(np.linalg.norm(vectors, axis=1) <= 1.0 + 1e-9)
    # three rounds' fresh OS-drawn noise on the same rows: 3 x 650 draws, so the sample std is within
    # 15 % of the target except with probability 2e-20 (chi-square), a false-failure rate below 1e-9
    noise = np.concatenate([fed.aggregate(vectors, {}, clip).total - vectors.sum(axis=0) for _ in range(3)])
    plan = fed.noise_plan
    expected = np.sqrt(len(sampled) * plan.share.variance) / plan.scale  # 12 shares arrived
    assert np.std(noise) == pytest.approx(expected, rel=0.15)
    # calibrated so that the `threshold` = 8 survivors, less the floor(11/3) = 3 assumed colluders
    # who subtract their own shares, carry noise_multiplier x sensitivity (this used to count
    # all 8 survivors' shares)
    assert plan.colluders == 3 and plan.share.min_survivors == 5
    assert np.sqrt(5 * plan.share.variance) / plan.scale == pytest.approx(1.0, rel=0.05)
    assert fed.accountant.round_event().mechanism.value == "distributed-dgauss"


def test_central_user_level_noise_is_added_to_the_sum(tmp_path):
    fed = Federation(user_dp_config(tmp_path, "user"))
    sampled = fed.sample_clients(1)
    vectors, clip = fed.encode_updates(fed.train_clients(1, sampled, {}))
    before = fed.params.copy()
    result = fed.aggregate(vectors, {}, clip)
    noise = []
    for _ in range(3):  # three fresh OS-drawn noise vectors on the same sum (FedAvg keeps no state)
        fed.params = before.copy()
        # the round's release adds the central noise (Federation.run_round), then the update applies it
        fed.apply_aggregate(replace(result, total=fed.release_total(result.total)))
        noise.append((fed.params - before) - vectors.sum(axis=0) / 12)
    # 3 x 650 draws: the sample std is within 15 % except with probability 2e-20 (chi-square), a
    # false-failure rate below 1e-9
    assert np.std(np.concatenate(noise)) == pytest.approx(1.0 / 12, rel=0.15)  # z * C / clients per round


def test_user_level_dp_runs_end_to_end(tmp_path):
    _, summary = run(user_dp_config(tmp_path, "user-distributed", rounds=2))
    assert summary.rounds[1].epsilon > summary.rounds[0].epsilon > 0


def test_a_round_below_threshold_aborts_keeps_the_model_and_still_counts_the_spend(tmp_path):
    from privacy.ledger import Ledger

    drops = [{"round": 2, "stage": "share", "clients": [0, 1, 2]}]
    fed, summary = run(config(tmp_path, rounds=3, protection="masking", threshold=4, dp="dpsgd",
                              noise_multiplier=1.5, budget_epsilon=30.0, accountant="rdp",
                              dropout_schedule=drops))
    aborted = summary.rounds[1]
    assert aborted.aborted and "abandoned" in aborted.aborted and aborted.included == []
    assert summary.rounds[0].accuracy == aborted.accuracy  # the model did not move in round 2
    assert summary.rounds[2].aborted is None
    with Ledger.open(tmp_path / "run" / "ledger.db", key=fed.ledger_key()) as ledger:
        assert [e.status for e in ledger.rows()] == ["released", "aborted", "released"]
    assert summary.rounds[2].epsilon == pytest.approx(fed.accountant.epsilon_after(3))
