"""The shops scenario measured: recommendation quality and what the item table costs on the wire.

    nice -n 19 .venv/bin/python benchmarks/bench_recsys.py                 # synthetic shops
    nice -n 19 .venv/bin/python benchmarks/bench_recsys.py --data-dir DIR  # your MovieLens copy
    .venv/bin/python benchmarks/bench_recsys.py --preset many-customers     # 16 shops, 22,124 customers
    .venv/bin/python benchmarks/bench_recsys.py --preset small-shops --out benchmarks/results/recsys_small_shops.json
    .venv/bin/python benchmarks/bench_recsys.py --markdown                 # the tables for the docs

On the scenario's data and hyper-parameters (``federation.scenarios``, seed 0), in one run:

- quality (HR@10 / NDCG@10, leave-one-out, full ranking): central model on pooled data, each shop
  alone, popularity, federated without protection, federated with masking, federated with masking
  and customer-level DP-SGD (the demo), and with masking and shop-level DP-FedAvg;
- bytes a shop uploads per round for the item table: plain float32 (the baseline), masking
  (measured by the protocol, key exchange included), CKKS (one round), and what a sparse upload of
  only the rows a shop changed would take (rows x (dim + 1) x 4 bytes + a 4-byte row index),
  counted from the vectors the shops actually handed to the protocol.

``--preset many-customers`` (16 large shops) and ``--preset small-shops`` (50 shops of 200
customers) run the same parts on the generator's other presets (``federation.recsys.synthetic.PRESETS``)
with the options in ``federation.scenarios.SHOPS_PRESET_OPTIONS``.

Every finished part is written to ``--out`` at once (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from federation.aggregators import make_aggregator
from federation.recsys.baselines import compute_baselines
from federation.recsys.federation import L2, ShopsFederation
from federation.recsys.synthetic import PRESETS, generate_shops
from federation.scenarios import SHOPS_PRESET_OPTIONS, shops_preset_config

OUT = ROOT / "benchmarks" / "results" / "recsys.json"


class Counting:
    """Delegates to a real aggregator and counts, per uploading shop, the item-table rows that are
    not all zero (what a sparse upload would have to carry)."""

    def __init__(self, inner, num_items: int, dim: int) -> None:
        self.inner, self.name = inner, inner.name
        self.num_items, self.dim = num_items, dim
        self.rows: list[int] = []
        self.width = 0  # coordinates a shop uploads: the item table, the FedAvg weight, the catalogue counts

    def aggregate(self, vectors, **kwargs):
        cut = self.num_items * self.dim
        self.width = np.asarray(vectors).shape[1]
        for v in np.asarray(vectors):
            touched = (v[:cut].reshape(self.num_items, self.dim) != 0).any(axis=1) | (v[cut:cut + self.num_items] != 0)
            self.rows.append(int(touched.sum()))
        return self.inner.aggregate(vectors, **kwargs)


def shops_config(*, dp: bool, data_dir: str | None, preset: str):
    cfg = shops_preset_config(preset, dp=dp)
    if data_dir:
        cfg.dataset, cfg.data_dir = "movielens", data_dir
    return cfg


def load_data(cfg, preset: str):
    """The scenario's data: the preset's synthetic shops, or what the config names."""
    if preset != "default":
        return generate_shops(PRESETS[preset], seed=cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ShopsFederation(cfg, aggregator=make_aggregator("none")).data


def run_variant(name: str, *, data_dir: str | None, preset: str, work: Path, **options) -> dict:
    cfg = shops_config(dp=options.pop("dp_on", True), data_dir=data_dir, preset=preset)
    for key, value in options.items():
        cfg.set(key, value)
    if not cfg.protection.startswith("masking"):
        cfg.threshold = None
    cfg.out_dir = str(work / name)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_data(cfg, preset)
        counter = Counting(make_aggregator(cfg.protection, threshold=cfg.threshold, bits=cfg.bits),
                           data.num_items, cfg.hidden)
        fed = ShopsFederation(cfg, data=data, aggregator=counter)
        summary = fed.run()
    rounds = summary.rounds
    shops_uploading = sum(len(r.included) for r in rounds)
    return {
        "variant": name, "protection": cfg.protection, "dp": cfg.dp, "rounds": len(rounds),
        "noise_multiplier": cfg.noise_multiplier if cfg.dp != "none" else None,
        "max_grad_norm": cfg.max_grad_norm if cfg.dp == "dpsgd" else None,
        "update_clip": cfg.update_clip, "epsilon": rounds[-1].epsilon, "delta": cfg.delta if cfg.dp != "none" else None,
        **fed.last_ranking.as_dict(),
        "per_shop_hr@10": [r.hr for r in fed.last_per_shop],
        "table_parameters": len(fed.params), "dim": cfg.hidden, "items": fed.data.num_items,
        "bytes_per_shop_round": sum(r.bytes_up_total for r in rounds) / max(shops_uploading, 1),
        "plain_bytes_per_shop_round": 4 * counter.width,
        "sparse_rows_per_shop_round": float(np.mean(counter.rows)),
        "sparse_bytes_per_shop_round": float(np.mean(counter.rows)) * ((cfg.hidden + 1) * 4 + 4),
        "catalogue_rows_mean": float(fed.data.catalogues.sum(axis=1).mean()),
        "seconds": time.perf_counter() - start, "data": fed.data.name,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with MovieLens ratings.csv or u.data")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--preset", choices=sorted(SHOPS_PRESET_OPTIONS), default="default",
                        help="the synthetic data's preset (federation.recsys.synthetic.PRESETS)")
    parser.add_argument("--parts", default="baselines,plain,masking,masking+dp,ckks,masking+shop-dp")
    parser.add_argument("--markdown", action="store_true", help="print the tables from --out and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    result = {"python": platform.python_version(), "machine": platform.machine(), "parts": {}}
    if args.out.exists():
        result = json.loads(args.out.read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-recsys-"))
    variants = {
        "plain": dict(dp_on=False, protection="none"),
        "masking": dict(dp_on=False, rounds=2),  # bytes per round; its model equals plain's (tested)
        "masking+dp": dict(),
        "ckks": dict(dp_on=False, protection="ckks", rounds=1),
        "masking+shop-dp": dict(dp="user", noise_multiplier=1.0, update_clip=1.0, budget_epsilon=50.0,
                                delta=1e-3),
    }
    for part in args.parts.split(","):
        print(f"running {part} ...", flush=True)
        if part == "baselines":
            cfg = shops_config(dp=True, data_dir=args.data_dir, preset=args.preset)
            data = load_data(cfg, args.preset)
            start = time.perf_counter()
            # the baselines are also tuned at the demo's batch of 50 where a preset's federation takes larger ones
            base = compute_baselines(data, dim=cfg.hidden, epochs=cfg.rounds * cfg.local_epochs,
                                     batch_size=cfg.batch_size, batch_sizes=(50,), l2=L2, seed=cfg.seed)
            result["parts"]["baselines"] = {**base.as_dict(), "data": data.name, "preset": args.preset,
                                            "describe": data.describe(),
                                            "seconds": time.perf_counter() - start}
        else:
            result["parts"][part] = run_variant(part, data_dir=args.data_dir, preset=args.preset, work=work,
                                                **variants[part])
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["parts"][part])[:400], flush=True)
    return 0


def markdown(result: dict) -> str:
    parts = result["parts"]
    base = parts.get("baselines", {})
    lines = [f"Data: {base.get('describe', '?')}", "",
             "| model | HR@10 | NDCG@10 | epsilon (delta) |", "|---|---|---|---|"]
    for key, label in (("central", "central model, pooled data (no protection)"),
                       ("shop_alone", "each shop alone"), ("popularity", "popularity (each shop's best-sellers)")):
        if key in base:
            lines.append(f"| {label} | {base[key]['hr@10']:.4f} | {base[key]['ndcg@10']:.4f} | - |")
    labels = {"plain": "federated, no protection (masking gives the same model)",
              "masking+dp": "federated, masking + customer-level DP-SGD",
              "masking+shop-dp": "federated, masking + shop-level DP-FedAvg"}
    for key, label in labels.items():
        if key in parts:
            p = parts[key]
            eps = "-" if p["dp"] == "none" else f"{p['epsilon']:.2f} ({p['delta']:g})"
            lines.append(f"| {label} | {p['hr@10']:.4f} | {p['ndcg@10']:.4f} | {eps} |")
    lines += ["", "| upload per shop and round | bytes |", "|---|---|"]
    ref = parts.get("masking") or parts.get("masking+dp")
    if ref:
        lines.append(f"| plain float32, dense ({ref['table_parameters']:,} parameters + weight + catalogue counts; baseline) | "
                     f"{ref['plain_bytes_per_shop_round']:,.0f} |")
        lines.append(f"| masking, dense (measured, key exchange included) | {ref['bytes_per_shop_round']:,.0f} |")
    if "ckks" in parts:
        lines.append(f"| CKKS, dense (measured) | {parts['ckks']['bytes_per_shop_round']:,.0f} |")
    if ref:
        lines.append(f"| sparse rows a shop changed ({ref['sparse_rows_per_shop_round']:.0f} of "
                     f"{ref['items']} items; not implemented) | {ref['sparse_bytes_per_shop_round']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
