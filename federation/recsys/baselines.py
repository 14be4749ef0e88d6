"""What federating is compared against, on the same data and held-out items:

- **central**: one model trained on the pooled customers of all shops (what the shops could do if
  they were allowed to pool their data; no protection, no DP) -- the ceiling;
- **each shop alone**: every shop trains its own model on its own customers only (no one shares
  anything, so no DP is needed) -- what federating must beat to be worth it;
- **popularity**: each shop recommends its own best-sellers (no learning at all) -- the floor.

Central and shop-alone models use the federation's dimension, learning rate and batch size and
see each customer as often as in the federated run (``epochs`` = rounds x local epochs). All
figures are HR@10 / NDCG@10 with leave-one-out full ranking (:mod:`federation.recsys.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.recsys.interactions import Interactions
from federation.recsys.metrics import EMPTY, Ranking, mf_scorer, rank_customers
from federation.recsys.model import INIT_STD, LocalSteps, init_users, train_customers


@dataclass(frozen=True)
class Baselines:
    central: Ranking
    alone: Ranking
    alone_per_shop: tuple[Ranking, ...]
    popularity: Ranking

    def as_dict(self) -> dict:
        return {"central": self.central.as_dict(), "shop_alone": self.alone.as_dict(),
                "shop_alone_per_shop": [r.as_dict() for r in self.alone_per_shop],
                "popularity": self.popularity.as_dict()}


def train_mf(data: Interactions, customers: np.ndarray, *, dim: int, epochs: int, batch_size: int,
             lr: float, l2: float, seed: int) -> Ranking:
    """Train matrix factorisation (no DP) on ``customers`` only and rank their held-out items."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBA5E]))
    factors = rng.normal(0.0, INIT_STD, (data.num_items, dim))
    bias = np.zeros(data.num_items)
    users = init_users(len(customers), dim, seed)
    steps = LocalSteps(epochs=epochs, batch_size=batch_size, lr=lr, user_lr=lr, l2=l2)
    train_customers(factors, bias, users, customers, data, steps, rng=rng)
    return rank_customers(mf_scorer(users, factors, bias), customers, data)


def popularity(data: Interactions, customers: np.ndarray) -> Ranking:
    """Each shop ranks its items by how often its own customers bought them in training."""
    counts = np.zeros((data.num_shops, data.num_items))
    np.add.at(counts, (np.repeat(data.shop_of, np.diff(data.train_indptr)), data.train_items), 1.0)
    # a fixed, data-independent tie-break (item id) so that ties do not all count against it
    scores = counts + np.linspace(0.0, 0.5, data.num_items)[::-1]
    shop = data.shop_of[customers]
    return rank_customers(lambda rows: scores[shop[rows]], customers, data)


def compute_baselines(data: Interactions, *, dim: int, epochs: int, batch_size: int, lr: float,
                      l2: float, seed: int) -> Baselines:
    everyone = np.arange(data.num_customers)
    central = train_mf(data, everyone, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr, l2=l2, seed=seed)
    per_shop = tuple(
        train_mf(data, data.customers_of(s), dim=dim, epochs=epochs, batch_size=batch_size, lr=lr, l2=l2,
                 seed=seed + s) for s in range(data.num_shops))
    alone = EMPTY
    for r in per_shop:
        alone = alone + r
    return Baselines(central=central, alone=alone, alone_per_shop=per_shop,
                     popularity=popularity(data, everyone))
