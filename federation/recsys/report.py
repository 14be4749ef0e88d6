"""The recommender's end-of-run comparison: federated against central, each shop alone and
popularity, on the same held-out items; printed and written to ``recommendation.json``.

The baselines are tuned on a grid, each at its best point on the held-out items
(:mod:`federation.recsys.baselines`); the federated model is the configured run's last round."""

from __future__ import annotations

import json

from federation.recsys.baselines import compute_baselines
from federation.recsys.federation import L2, ShopsFederation

RESULT_FILE = "recommendation.json"


def comparison(fed: ShopsFederation) -> dict:
    """HR@10 / NDCG@10 of the federated model (the last evaluation) and of the baselines."""
    c = fed.config
    # also tuned at the demo's batch of 50, which suits a shop alone better than a preset's larger batches
    base = compute_baselines(fed.data, dim=c.hidden, epochs=c.rounds * c.local_epochs, batch_size=c.batch_size,
                             batch_sizes=(50,), l2=L2, seed=c.seed)
    federated = fed.last_ranking
    return {
        "data": fed.data.name, "synthetic": fed.data.synthetic, "shops": fed.data.num_shops,
        "customers": fed.data.num_customers, "items": fed.data.num_items,
        "evaluation": "leave-one-out, full ranking over the shop's catalogue minus the customer's training items",
        "federated": {**federated.as_dict(), "protection": c.protection, "dp": c.dp,
                      "epsilon": fed.accountant.epsilon_after(c.rounds) if fed.accountant.is_private else None,
                      "delta": c.delta if fed.accountant.is_private else None},
        "federated_per_shop": [r.as_dict() for r in fed.last_per_shop],
        **base.as_dict(),
    }


def print_comparison(fed: ShopsFederation, *, as_json: bool) -> dict:
    result = comparison(fed)
    (fed.out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps({"event": "recommendation", **result}), flush=True)
        return result
    fedrow = result["federated"]
    dp = "no DP" if fedrow["dp"] == "none" else (
        f"{_unit(fedrow['dp'])}-level DP, epsilon {fedrow['epsilon']:.2f} at delta {fedrow['delta']:g}")
    print()
    print(f"Recommendation quality on {result['data']} ({result['evaluation']}):")
    rows = [("central model on pooled data (no protection; best lr and epochs)", result["central"]),
            ("each shop alone (its own customers only; each at its best lr and epochs)", result["shop_alone"]),
            (f"federated ({fedrow['protection']}, {dp})", fedrow),
            ("popularity (each shop's best-sellers)", result["popularity"])]
    width = max(len(name) for name, _ in rows)
    print(f"  {'model':<{width}}  HR@10   NDCG@10")
    for name, row in rows:
        print(f"  {name:<{width}}  {row['hr@10']:.4f}  {row['ndcg@10']:.4f}")
    print(f"  Written to {fed.out_dir / RESULT_FILE}")
    return result


def _unit(dp: str) -> str:
    return {"dpsgd": "customer", "user": "shop", "user-distributed": "shop"}.get(dp, dp)

