"""The shops federation: the round engine, with every shop's customer embeddings kept on the shop.

:class:`ShopsFederation` is a :class:`federation.engine.Federation` whose global model is the
item table (:class:`~federation.recsys.model.ItemTable`) and whose clients are shops. It changes
three steps of the round and nothing else:

- **local training** runs in a :class:`ShopExecutor`, which stands for the shops' own machines:
  it holds each shop's customer embeddings between rounds, trains them and the item table on the
  shop's customers (customer-level DP-SGD under ``dp = "dpsgd"``), and returns only the item
  table's update. Customer embeddings never enter a :class:`~federation.engine.TrainTask`, a
  :class:`~federation.training.ClientUpdate`, the aggregator or the checkpoint;
- **evaluation** asks every shop to rank its customers' held-out items with its own customer
  embeddings and the current item table (HR@10, NDCG@10; :mod:`federation.recsys.metrics`) and
  adds up the shops' counts;
- **the server step** is per-item FedAvg: every shop also uploads, inside the masked vector, its
  (public) catalogue as 0/1 per item times its FedAvg weight, and every row of the item table moves
  by the mean update of the shops that sell that item (:meth:`ShopsFederation.apply_aggregate`).

Sampling, fault planning, the write-ahead ledger, clipping and weighting, secure aggregation
(masking, SecAgg+ or CKKS), the server strategy, checkpoints and the report are the engine's.

DP units: ``dp = "dpsgd"`` protects one **customer** (all their purchases; the engine's client
sizes count customers); ``dp = "user"`` protects one **shop** (DP-FedAvg on the secure sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from federation.config import ExperimentConfig
from federation.engine import Federation, TrainTask
from federation.recsys import RECSYS_DATASETS
from federation.recsys.interactions import Interactions
from federation.recsys.metrics import EMPTY, Ranking, mf_scorer, rank_customers
from federation.recsys.model import LocalSteps, TableShape, init_users, train_customers
from federation.training import ClientUpdate
from secagg.errors import ConfigError
from secagg.rounds import RoundOutcome

L2 = 1e-3  # weight decay of the customer embeddings


class ShopExecutor:
    """The shops' side of local training (in this process; one state per shop).

    ``users[shop]`` are the embeddings of that shop's customers, in the order of the customer ids
    the engine hands over (the shop's rows of the partition). They are created on first use and
    stay here.
    """

    def __init__(self, data: Interactions, shape: TableShape, *, seed: int, deterministic: bool) -> None:
        self.data = data
        self.shape = shape
        self.seed = seed
        self.deterministic = deterministic
        self.users: dict[int, np.ndarray] = {}

    def customer_embeddings(self, shop: int) -> np.ndarray:
        if shop not in self.users:
            count = len(self.data.customers_of(shop))
            self.users[shop] = init_users(count, self.shape.dim, self.seed * 1_000_003 + shop)
        return self.users[shop]

    def run(self, tasks: Sequence[TrainTask]) -> list[ClientUpdate]:
        return [self.train(task) for task in tasks]

    def train(self, task: TrainTask) -> ClientUpdate:
        customers = task.x[:, 0].astype(np.int64)
        if not np.array_equal(customers, self.data.customers_of(task.client)):
            raise ConfigError(f"shop {task.client} was handed customers that are not its own; "
                              "use partition = 'natural' (one shop per client)")
        factors, bias = self.shape.split(task.global_params)
        cfg = task.config
        steps = LocalSteps(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, user_lr=cfg.lr, l2=L2,
                           noise_multiplier=cfg.noise_multiplier if cfg.dp_sgd else None,
                           max_grad_norm=cfg.max_grad_norm)
        # task.seed is secret under DP (the engine draws it from the OS): it fixes the batches.
        rng = np.random.default_rng(task.seed)
        noise_rng = np.random.default_rng([task.seed, 1]) if self.deterministic else None
        loss, taken = train_customers(factors, bias, self.customer_embeddings(task.client), customers,
                                      self.data, steps, rng=rng, noise_rng=noise_rng)
        delta = self.shape.join(factors, bias) - task.global_params
        return ClientUpdate(client=task.client, delta=delta, num_samples=len(customers), loss=loss,
                            steps=taken, sample_rate=min(1.0, cfg.batch_size / len(customers)))

    def evaluate(self, shop: int, params: np.ndarray) -> Ranking:
        """The shop ranks its customers' held-out items (it reports only the counts)."""
        factors, bias = self.shape.split(params)
        customers = self.data.customers_of(shop)
        return rank_customers(mf_scorer(self.customer_embeddings(shop), factors, bias), customers, self.data)


class ShopsFederation(Federation):
    """A federated recommender over shops; see the module docstring.

    ``data`` defaults to what ``config.dataset`` names: ``"shops"`` (synthetic, generated with
    ``config.num_clients`` shops and ``config.seed``) or ``"movielens"`` (files under
    ``config.data_dir``, split into ``config.num_clients`` shops).
    """

    def __init__(self, config: ExperimentConfig, *, data: Interactions | None = None, aggregator=None) -> None:
        if config.dataset not in RECSYS_DATASETS or config.model != "mf" or config.partition != "natural":
            raise ConfigError("the shops federation trains model = 'mf' on dataset = 'shops' or 'movielens' "
                              "with partition = 'natural' (one shop per client)")
        if data is None:
            from federation.recsys.datasets import load_interactions

            data = load_interactions(config.dataset, config.data_dir, shops=config.num_clients,
                                     seed=config.seed)
        if data.num_shops != config.num_clients:
            raise ConfigError(f"the data has {data.num_shops} shops but num_clients = {config.num_clients}")
        self.data = data
        shape = TableShape(data.num_items, config.hidden)
        executor = ShopExecutor(data, shape, seed=config.seed, deterministic=config.deterministic)
        super().__init__(config, executor=executor, aggregator=aggregator, dataset=data.as_dataset(config.dataset))
        self.shops = executor
        self.last_ranking = EMPTY
        self.last_per_shop: tuple[Ranking, ...] = ()

    @property
    def dp_unit(self) -> str:
        """What one DP guarantee protects here, in words (the console prints it)."""
        if self.config.dp == "dpsgd":
            return "customer-level: one customer and all their purchases (DP-SGD in every shop)"
        return "shop-level: one shop and all its customers (DP-FedAvg)"

    @property
    def upload_width(self) -> int:
        return super().upload_width + (self.data.num_items if self.weighted else 0)

    def encode_updates(self, updates: Sequence[ClientUpdate | None]) -> tuple[np.ndarray, float | None]:
        """The engine's rows ``[w_k * delta_k, w_k]``, followed in the weighted modes by
        ``w_k * c_k``: shop k's catalogue as 0/1 per item, times its FedAvg weight.

        The protocol sums these too, so the server learns for every item only the total weight of
        the shops that sell it (not which shops do) and can average an item's row over those shops
        (:meth:`apply_aggregate`). The indicators depend on the catalogue, not on any customer, so
        under customer-level DP they have sensitivity zero and cost no epsilon.
        """
        rows, bound = super().encode_updates(updates)
        if not self.weighted:
            return rows, bound
        carries = np.zeros((len(updates), self.data.num_items))
        for row, update in enumerate(updates):
            if update is not None:
                carries[row] = rows[row, -1] * self.data.catalogues[update.client]
        widest = int(self.data.catalogues.sum(axis=1).max())  # w_k <= 1: the indicators' norm is at most this root
        return np.hstack([rows, carries]), None if bound is None else float(np.sqrt(bound**2 + widest))

    def apply_aggregate(self, result: RoundOutcome) -> bool:
        """Per-item FedAvg: every row of the item table moves by the weighted mean update of the
        shops that **sell** that item, not of all shops -- plain FedAvg would dilute an item's update
        by the shops that cannot touch it (their rows are exact zeros), so items sold by a few shops
        would learn a few times slower than in a shop alone. Without the weights (shop-level DP) it
        is the engine's step."""
        if not self.weighted:
            return super().apply_aggregate(result)
        d = len(self.params)
        total = np.asarray(result.total, dtype=np.float64)
        if total[d] <= 0:
            return False
        carried = total[d + 1:]
        # weights are at least min(n_k) / max(n_k); below half of that the sum is quantisation error
        sold = carried > 0.5 * min(self.sizes) / max(self.sizes)
        scale = np.divide(1.0, carried, out=np.zeros_like(carried), where=sold)
        factors, bias = self.shops.shape.split(total[:d])
        mean = self.shops.shape.join(factors * scale[:, None], bias * scale)
        self.params = self.strategy.apply(self.params, mean).astype(np.float32)
        return True

    def evaluate(self) -> tuple[float | None, float]:
        """Every shop evaluates locally; returns (None, held-out loss): the recommender's figures
        are HR@10 and NDCG@10 (:meth:`metrics`), not a classification accuracy."""
        per_shop = tuple(self.shops.evaluate(shop, self.params) for shop in range(self.data.num_shops))
        total = EMPTY
        for ranking in per_shop:
            total = total + ranking
        self.last_ranking, self.last_per_shop = total, per_shop
        return None, total.loss

    def metrics(self) -> dict[str, float]:
        ranking = self.last_ranking.as_dict()
        return {k: ranking[k] for k in ("hr@10", "ndcg@10")}
