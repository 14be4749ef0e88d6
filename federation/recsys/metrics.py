"""HR@K and NDCG@K on held-out interactions: leave-one-out, **full ranking**.

Every customer has one held-out item (:mod:`federation.recsys.interactions`). Their scores rank
it against *every* item of their shop's catalogue that they did not buy in training -- not against
a sample of 99 or 100 negatives: sampled metrics can reorder models (Krichene & Rendle, "On Sampled
Metrics for Item Recommendation", KDD 2020). Ties count against the model (an item scoring the
same as the held-out one ranks before it), so a constant scorer earns nothing from ties.

- HR@K: the fraction of customers whose held-out item ranks in the top K;
- NDCG@K: the mean of ``1 / log2(rank + 2)`` over customers whose item ranks in the top K
  (rank 0 is the top), 0 for the others -- one relevant item, so the ideal DCG is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.recsys.interactions import Interactions

K = 10


@dataclass(frozen=True)
class Ranking:
    """Sums over evaluated customers, so that shops' results add up."""

    customers: int
    hits: int
    ndcg_sum: float
    loss_sum: float

    @property
    def hr(self) -> float:
        return self.hits / self.customers if self.customers else 0.0

    @property
    def ndcg(self) -> float:
        return self.ndcg_sum / self.customers if self.customers else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.customers if self.customers else 0.0

    def __add__(self, other: Ranking) -> Ranking:
        return Ranking(self.customers + other.customers, self.hits + other.hits,
                       self.ndcg_sum + other.ndcg_sum, self.loss_sum + other.loss_sum)

    def as_dict(self) -> dict[str, float]:
        return {f"hr@{K}": self.hr, f"ndcg@{K}": self.ndcg, "heldout_loss": self.loss,
                "customers": float(self.customers)}


EMPTY = Ranking(0, 0, 0.0, 0.0)


def held_out_ranks(scores: np.ndarray, customers: np.ndarray, data: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """(rank, log-probability) of each customer's held-out item given their (rows, items) scores.

    Items outside the customer's shop catalogue and items they bought in training are excluded
    from the ranking (and from the softmax of the log-probability).
    """
    allowed = data.catalogues[data.shop_of[customers]] & (data.train_matrix(customers) == 0)
    scores = np.where(allowed, scores, -np.inf)
    target = scores[np.arange(len(customers)), data.test_item[customers]]
    rank = (scores >= target[:, None]).sum(axis=1) - 1
    top = scores.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    return rank, target - log_z


def rank_customers(
    scorer, customers: np.ndarray, data: Interactions, *, k: int = K, batch: int = 1024
) -> Ranking:
    """Evaluate ``scorer(rows) -> (len(rows), items) scores`` on ``customers`` (positions in the
    scorer's own order are 0..len(customers)-1)."""
    total = EMPTY
    for start in range(0, len(customers), batch):
        rows = np.arange(start, min(start + batch, len(customers)))
        rank, log_p = held_out_ranks(scorer(rows), customers[rows], data)
        hit = rank < k
        total = total + Ranking(len(rows), int(hit.sum()),
                                float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).sum()),
                                float(-log_p.sum()))
    return total


def mf_scorer(users: np.ndarray, factors: np.ndarray, bias: np.ndarray):
    """Scores of matrix factorisation for the customers whose embeddings are ``users``."""
    return lambda rows: users[rows] @ factors.T + bias
