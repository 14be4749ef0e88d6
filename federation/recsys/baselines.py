"""What federating is compared against, on the same data and held-out items:

- **central**: one model trained on the pooled customers of all shops (what the shops could do if
  they were allowed to pool their data; no protection, no DP) -- the ceiling;
- **each shop alone**: every shop trains its own model on its own customers only (no one shares
  anything, so no DP is needed) -- what federating must beat to be worth it;
- **popularity**: each shop recommends its own best-sellers (no learning at all) -- the floor.

Central and shop-alone models use the federation's dimension and batch size (and, where given,
smaller batch sizes too) and are **tuned at least as hard as the federation**: each is trained
along one trajectory per learning rate of a grid (:data:`LEARNING_RATES`) and batch size and
ranked after each number of epochs of a grid (:func:`epoch_grid`: up to twice what the federation
trains); every shop keeps its best point, and
so does the central model. The best point is chosen on the held-out items themselves -- an
optimistic (oracle) choice that favours the baselines, so "federated beats each shop alone" is
claimed against the best a shop alone could have reached with any of those settings. All figures
are HR@10 / NDCG@10 with leave-one-out full ranking (:mod:`federation.recsys.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from federation.recsys.interactions import Interactions
from federation.recsys.metrics import EMPTY, Ranking, mf_scorer, rank_customers
from federation.recsys.model import INIT_STD, LocalSteps, init_users, train_customers
from secagg.errors import ConfigError

LEARNING_RATES = (1.0, 2.0, 4.0)  # the grid the baselines are tuned over (the federation uses one)


@dataclass(frozen=True)
class Tuned:
    """A baseline's best point on the grid: its ranking and the setting that reached it."""

    ranking: Ranking
    lr: float
    epochs: int
    batch_size: int

    def as_dict(self) -> dict:
        return {**self.ranking.as_dict(), "lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size}


@dataclass(frozen=True)
class Baselines:
    central: Tuned
    alone_per_shop: tuple[Tuned, ...]
    popularity: Ranking

    @property
    def alone(self) -> Ranking:
        """Every shop alone at its own best point, customers pooled."""
        total = EMPTY
        for tuned in self.alone_per_shop:
            total = total + tuned.ranking
        return total

    def as_dict(self) -> dict:
        return {"central": self.central.as_dict(), "shop_alone": self.alone.as_dict(),
                "shop_alone_per_shop": [t.as_dict() for t in self.alone_per_shop],
                "popularity": self.popularity.as_dict()}


def epoch_grid(epochs: int) -> tuple[int, ...]:
    """The epoch counts a baseline is ranked at: 1, 2, 4, ... and ``epochs`` and ``2 * epochs``
    (the federation trains ``epochs`` = rounds x local epochs; the baselines may train twice as long)."""
    grid = {epochs, 2 * epochs}
    e = 1
    while e < 2 * epochs:
        grid.add(e)
        e *= 2
    return tuple(sorted(grid))


def train_mf(data: Interactions, customers: np.ndarray, *, dim: int, checkpoints: Sequence[int], batch_size: int,
             lr: float, l2: float, seed: int) -> dict[int, Ranking]:
    """Train matrix factorisation (no DP) on ``customers`` only, along one trajectory, and rank
    their held-out items after each number of epochs in ``checkpoints``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBA5E]))
    factors = rng.normal(0.0, INIT_STD, (data.num_items, dim))
    bias = np.zeros(data.num_items)
    users = init_users(len(customers), dim, seed)
    one_epoch = LocalSteps(epochs=1, batch_size=batch_size, lr=lr, user_lr=lr, l2=l2)
    rankings, done = {}, 0
    for target in sorted(checkpoints):
        for _ in range(target - done):  # epoch by epoch with one generator: the same run as epochs=target
            train_customers(factors, bias, users, customers, data, one_epoch, rng=rng)
        done = target
        rankings[target] = rank_customers(mf_scorer(users, factors, bias), customers, data)
    return rankings


def tune_mf(data: Interactions, customers: np.ndarray, *, dim: int, epochs: int, batch_size: int, l2: float,
            seed: int, lrs: Sequence[float] = LEARNING_RATES, batch_sizes: Sequence[int] = ()) -> Tuned:
    """The best (HR@10, then NDCG@10) of :func:`train_mf` over ``lrs`` x :func:`epoch_grid` x the
    batch sizes ``batch_size`` and ``batch_sizes`` (a federation with large batches still has its
    shops alone tuned at smaller ones, which take more steps per epoch)."""
    if not lrs:
        raise ConfigError("tune_mf needs at least one learning rate in lrs")
    points = [Tuned(ranking, lr, count, batch) for batch in sorted({batch_size, *batch_sizes}) for lr in lrs
              for count, ranking in train_mf(data, customers, dim=dim, checkpoints=epoch_grid(epochs),
                                             batch_size=batch, lr=lr, l2=l2, seed=seed).items()]
    return max(points, key=lambda t: (t.ranking.hits, t.ranking.ndcg_sum))


def popularity(data: Interactions, customers: np.ndarray) -> Ranking:
    """Each shop ranks its items by how often its own customers bought them in training."""
    counts = np.zeros((data.num_shops, data.num_items))
    np.add.at(counts, (np.repeat(data.shop_of, np.diff(data.train_indptr)), data.train_items), 1.0)
    # a fixed, data-independent tie-break (item id) so that ties do not all count against it
    scores = counts + np.linspace(0.0, 0.5, data.num_items)[::-1]
    shop = data.shop_of[customers]
    return rank_customers(lambda rows: scores[shop[rows]], customers, data)


def compute_baselines(data: Interactions, *, dim: int, epochs: int, batch_size: int, l2: float, seed: int,
                      lrs: Sequence[float] = LEARNING_RATES, batch_sizes: Sequence[int] = ()) -> Baselines:
    """Central, every shop alone (each tuned; see the module docstring) and popularity."""
    everyone = np.arange(data.num_customers)
    tune = {"dim": dim, "epochs": epochs, "batch_size": batch_size, "l2": l2, "lrs": lrs,
            "batch_sizes": batch_sizes}
    central = tune_mf(data, everyone, seed=seed, **tune)
    per_shop = tuple(tune_mf(data, data.customers_of(s), seed=seed + s, **tune) for s in range(data.num_shops))
    return Baselines(central=central, alone_per_shop=per_shop, popularity=popularity(data, everyone))
