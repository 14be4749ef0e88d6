"""The shops federation: what leaves a shop, secure aggregation of the item table (masking and
CKKS), the ledger, the CLI, and the reason to federate -- HR@10 above every shop alone."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from federation.aggregators import PlainAggregator
from federation.config import ExperimentConfig
from federation.recsys.baselines import tune_mf
from federation.recsys.federation import L2, ShopsFederation
from federation.recsys.synthetic import PRESETS, SyntheticShops, generate_shops
from federation.scenarios import SHOPS_PRESET_OPTIONS, scenario_config, shops_preset_config
from secagg.cli import main
from secagg.commands.demo import SHOPS_PRESETS
from secagg.errors import ConfigError

TINY = SyntheticShops(num_shops=4, customers_per_shop=40, min_customers=30, num_items=60)


def config(tmp_path, **options) -> ExperimentConfig:
    base = dict(dataset="shops", num_clients=4, partition="natural", model="mf", hidden=4, rounds=2,
                clients_per_round=4, local_epochs=1, batch_size=16, lr=1.0, protection="none",
                update_clip=100.0, out_dir=str(tmp_path / "run"), name="shops", deterministic=True)
    base.update(options)
    return ExperimentConfig.from_dict(base)


def federation(cfg: ExperimentConfig, data, **kwargs) -> ShopsFederation:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deterministic = true warns, as it must
        return ShopsFederation(cfg, data=data, **kwargs)


class Recording(PlainAggregator):
    """The plain sum, keeping a copy of every vector the shops hand to the protocol."""

    def __init__(self) -> None:
        object.__setattr__(self, "seen", [])

    def aggregate(self, vectors, **kwargs):
        self.seen.append(np.array(vectors))
        return super().aggregate(vectors, **kwargs)


def test_a_shop_uploads_only_the_item_table_and_keeps_its_customers(tmp_path):
    data = generate_shops(TINY, seed=0)
    recorder = Recording()
    fed = federation(config(tmp_path), data, aggregator=recorder)
    fed.run()
    table = data.num_items * (4 + 1)
    for vectors in recorder.seen:
        # item factors + biases + the FedAvg weight + the weighted catalogue indicators, nothing else
        assert vectors.shape == (4, table + 1 + data.num_items)
        for shop in range(4):
            factors = vectors[shop, :data.num_items * 4].reshape(data.num_items, 4)
            # items the shop does not sell are exact zeros: a dense vector with a sparse support
            assert not factors[~data.catalogues[shop]].any() and factors[data.catalogues[shop]].any()
            # the per-item counts are the shop's public catalogue times its weight, nothing about a customer
            weight = vectors[shop, table]
            assert weight > 0 and np.array_equal(vectors[shop, table + 1:], weight * data.catalogues[shop])
    for shop in range(4):  # customer embeddings exist only in the shop's own state
        assert fed.shops.users[shop].shape == (len(data.customers_of(shop)), 4)


def test_every_item_row_moves_by_the_mean_update_of_the_shops_that_sell_it(tmp_path):
    """Per-item FedAvg: an item's row is averaged over the shops whose catalogue holds it (weighted
    by customers), not over all shops -- plain FedAvg would shrink the update of an item sold by one
    shop in four by a factor of about four."""
    data = generate_shops(TINY, seed=2)
    recorder = Recording()
    fed = federation(config(tmp_path, rounds=1, server_lr=2.0), data, aggregator=recorder)
    before = fed.params.astype(np.float64)
    fed.run()
    (vectors,) = recorder.seen
    table = data.num_items * (4 + 1)
    weights = vectors[:, table]
    sellers = weights @ data.catalogues  # the weight of the shops selling each item
    assert (sellers < weights.sum() - 1e-9).any()  # some items are not sold everywhere: the case that matters
    sellers = np.where(sellers > 0, sellers, 1.0)  # items nobody sells: a zero row, which must stay put
    expected = np.zeros(table)
    for rows, cut in ((slice(0, data.num_items * 4), 4), (slice(data.num_items * 4, table), 1)):
        summed = vectors[:, rows].sum(axis=0).reshape(data.num_items, cut)
        expected[rows] = (summed / sellers[:, None]).ravel()
    assert np.allclose(fed.params - before, 2.0 * expected, atol=1e-5)


@pytest.mark.parametrize("protection", ["masking", "ckks"])
def test_secure_aggregation_gives_the_plain_model(tmp_path, protection):
    pytest.importorskip("tenseal") if protection == "ckks" else None
    data = generate_shops(TINY, seed=1)
    plain = federation(config(tmp_path / "plain", rounds=1), data)
    plain.run()
    secure = federation(config(tmp_path / "secure", rounds=1, protection=protection,
                               threshold=3 if protection == "masking" else None), data)
    summary = secure.run()
    assert summary.rounds[0].included == [0, 1, 2, 3]
    assert np.allclose(secure.params, plain.params, atol=1e-4)
    assert summary.rounds[0].metrics["hr@10"] == pytest.approx(plain.last_ranking.hr, abs=0.02)


def test_wrong_model_or_dataset_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="model 'mf'"):
        ExperimentConfig.from_dict(dict(dataset="shops", model="logreg")).validate()
    with pytest.raises(ConfigError, match="partition = 'natural'"):
        federation(config(tmp_path, partition="iid"), generate_shops(TINY))
    with pytest.raises(ConfigError, match="4 shops but num_clients = 5"):
        federation(config(tmp_path, num_clients=5, clients_per_round=5), generate_shops(TINY))


def test_demo_help_lists_shops(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "shops" in capsys.readouterr().out


def test_shops_demo_runs_through_the_cli_with_ledger_report_and_comparison(tmp_path, capsys):
    out = tmp_path / "shops"
    assert main(["demo", "--scenario", "shops", "--rounds", "1", "--out", str(out), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rounds = [e for e in events if e["event"] == "round"]
    summary = next(e for e in events if e["event"] == "summary")
    comparison = next(e for e in events if e["event"] == "recommendation")
    assert len(rounds) == 1 and set(rounds[0]["metrics"]) == {"hr@10", "ndcg@10"}
    assert summary["protection"] == "masking" and summary["dp"] == "dpsgd" and 0 < summary["epsilon"] <= 10
    assert (out / "ledger.db").is_file() and (out / "privacy_report.html").is_file()
    assert comparison["synthetic"] is True and comparison["data"].startswith("synthetic shops")
    for key in ("central", "shop_alone", "popularity", "federated"):
        assert 0 <= comparison[key]["hr@10"] <= 1
    assert json.loads((out / "recommendation.json").read_text())["customers"] == comparison["customers"]


def test_demo_help_names_the_synthetic_presets_and_the_cli_knows_every_preset(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {default,many-customers,small-shops}" in text and "synthetic data" in text
    assert set(SHOPS_PRESETS) == set(SHOPS_PRESET_OPTIONS)  # the CLI's list (kept import-light) matches


def test_small_shops_preset_runs_through_the_demo_cli(tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["demo", "--scenario", "shops", "--preset", "small-shops", "--rounds", "1", "--out", str(out),
                 "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e["event"] == "summary")
    comparison = next(e for e in events if e["event"] == "recommendation")
    assert summary["protection"] == "masking" and summary["dp"] == "dpsgd" and 0 < summary["epsilon"] <= 10
    assert next(e for e in events if e["event"] == "round")["included"] == list(range(50))
    assert comparison["synthetic"] is True and comparison["shops"] == 50 and comparison["items"] == 300
    assert comparison["customers"] == 50 * 200 and len(comparison["federated_per_shop"]) == 50


@pytest.mark.parametrize("argv", [["--scenario", "hospitals", "--preset", "small-shops"],
                                  ["--scenario", "shops", "--preset", "many-customers", "--data-dir", "x"]])
def test_a_preset_without_synthetic_shops_is_refused(tmp_path, capsys, argv):
    assert main(["demo", *argv, "--out", str(tmp_path / "run")]) == 1
    assert "picks synthetic shops: use it with --scenario shops" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_masked_federation_beats_every_shop_alone_on_the_scenario_data(tmp_path):
    """The reason to federate, on the demo's synthetic data with masking (no DP: at this size
    customer-level DP costs more than federating gains; docs/recommendation.md has the figures),
    against every shop alone **tuned** as in federation.recsys.baselines (learning rates 1, 2, 4,
    best of 1-40 epochs, every shop at its own best point). Until per-item FedAvg this only held
    against shops trained with the federation's own learning rate and epochs; now it holds against
    the tuned baseline. Deterministic: the data, batches and masks come from the fixed seeds, so
    the margins are fixed numbers for these seeds, not statistics."""
    cfg = scenario_config("shops", dp=False)
    cfg.set("deterministic", True)
    cfg.set("eval_every", 20)
    cfg.set("out_dir", str(tmp_path / "run"))
    fed = federation(cfg, None)
    summary = fed.run()
    assert summary.rounds[-1].included == list(range(8)) and summary.config.protection == "masking"
    alone = [tune_mf(fed.data, fed.data.customers_of(s), dim=cfg.hidden, epochs=cfg.rounds * cfg.local_epochs,
                     batch_size=cfg.batch_size, l2=L2, seed=cfg.seed + s).ranking for s in range(8)]
    pooled_alone = sum(r.hits for r in alone) / fed.data.num_customers
    assert fed.last_ranking.hr >= pooled_alone + 0.02  # measured: 0.3619 against 0.3323
    assert all(f.hr > a.hr for f, a in zip(fed.last_per_shop, alone))  # and in every shop (by 0.002-0.071)


@pytest.mark.slow
def test_with_many_customers_customer_level_dp_costs_no_accuracy(tmp_path):
    """At the generator's many-customers preset (22,124 customers in 16 shops, a 300 x 8 table),
    masking + customer-level DP-SGD at the ledger's epsilon <= 10 is no worse than the same
    federation without DP (docs/recommendation.md; it still trails each tuned shop alone there).
    Deterministic: data, batches, masks and the DP noise come from the fixed seeds (the noise is
    not private in this mode, the engine says so), so the margin is a fixed number for these
    seeds, not a statistic: HR@10 0.4774 against 0.4012 with per-item FedAvg (0.4701 against 0.4032
    with plain FedAvg)."""
    data = generate_shops(PRESETS["many-customers"], seed=0)
    runs = {}
    for dp in (True, False):
        cfg = shops_preset_config("many-customers", dp=dp)
        cfg.set("deterministic", True)
        if not dp:  # the plain run: no protection (masking gives the same model, tested above)
            cfg.set("protection", "none")
            cfg.set("threshold", None)
        cfg.set("out_dir", str(tmp_path / f"dp-{dp}"))
        fed = federation(cfg, data)
        runs[dp] = (fed, fed.run())
    (private, summary), (plain, _) = runs[True], runs[False]
    assert summary.config.protection == "masking" and summary.rounds[-1].included == list(range(16))
    epsilon = private.open_ledger().spent()["prv"]  # the ledger's epsilon at delta 1e-5; unit: one customer
    assert 0 < epsilon <= 10 and summary.rounds[-1].epsilon == pytest.approx(epsilon)
    assert private.last_ranking.hr >= plain.last_ranking.hr + 0.03


@pytest.mark.slow
def test_small_shops_with_masking_and_customer_dp_beat_each_shop_alone(tmp_path):
    """The reason to federate, with every protection on: on the generator's small-shops preset
    (50 shops of 200 customers, 300 items), the federation with real masking and customer-level
    DP-SGD (40 rounds at sigma 4), at the ledger's epsilon <= 10, ranks the held-out items better
    than each shop alone **tuned as in federation.recsys.baselines** (learning rates 1, 2, 4; batch
    sizes 100 -- the federation's -- and 50; best of 1-160 epochs, twice the federation's 80; every
    shop at its own best point, chosen on the held-out items). About 100 s of CPU (user time,
    pytest included, load average about 1-2 on a 2-core machine), mostly the tuned baseline (300
    training runs of up to 160 epochs) and the engine's masking among 50 shops and its ledger. Deterministic: the data, batches, masks and the DP noise come from the fixed seeds
    (the noise is not private in this mode; the engine warns), so the margins are fixed numbers for
    these seeds, not statistics."""
    data = generate_shops(PRESETS["small-shops"], seed=0)
    cfg = shops_preset_config("small-shops", dp=True)
    cfg.set("deterministic", True)
    cfg.set("out_dir", str(tmp_path / "run"))
    fed = federation(cfg, data)
    summary = fed.run()
    assert summary.config.protection == "masking" and summary.config.dp == "dpsgd"
    assert summary.rounds[-1].included == list(range(50))
    epsilon = fed.open_ledger().spent()["prv"]  # the ledger's epsilon at delta 1e-5; unit: one customer
    assert 0 < epsilon <= 10 and summary.rounds[-1].epsilon == pytest.approx(epsilon)
    # the shops alone are tuned at the federation's batch of 100 and at 50, which suits them better
    alone = [tune_mf(data, data.customers_of(s), dim=cfg.hidden, epochs=cfg.rounds * cfg.local_epochs,
                     batch_size=cfg.batch_size, batch_sizes=(50,), l2=L2, seed=cfg.seed + s).ranking
             for s in range(50)]
    pooled_alone = sum(r.hits for r in alone) / data.num_customers
    assert fed.last_ranking.hr >= pooled_alone + 0.08  # measured: 0.5085 against 0.4058 (epsilon 7.73)
    wins = sum(f.hr > a.hr for f, a in zip(fed.last_per_shop, alone))
    assert wins >= 48  # measured: 49 of the 50 shops above their best alone, 1 below by 0.015
