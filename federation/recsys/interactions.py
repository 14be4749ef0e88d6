"""Implicit-feedback data held per customer, split leave-one-out, grouped by shop.

A shop knows its customers and what they bought (an *interaction*: customer, item; no rating).
:class:`Interactions` keeps, for every customer, the items used for training (a CSR layout:
``train_items[train_indptr[c]:train_indptr[c + 1]]``) and one held-out item for evaluation
(leave-one-out: the latest interaction when timestamps exist, else one drawn with the public
seed), plus the shop each customer belongs to and each shop's catalogue (the items it sells).

Catalogues are treated as public (a shop's catalogue is on its website); customers and what they
bought are private to their shop.

The round engine partitions one row per *customer* (:meth:`Interactions.as_dataset`), so that
record-level DP-SGD accounting counts customers: the DP unit of ``dp = "dpsgd"`` in this scenario
is one customer and all their interactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.data import Dataset
from secagg.errors import DataError

MIN_INTERACTIONS = 3  # two to train on (at least) and one to hold out


@dataclass(frozen=True)
class Interactions:
    """Customers' interactions, split leave-one-out; see the module docstring.

    ``name`` says where the data comes from and is shown wherever results are: the generator's
    data is always called "synthetic ...".
    """

    name: str
    num_items: int
    shop_of: np.ndarray  # (customers,) shop index of each customer
    catalogues: np.ndarray  # (shops, items) bool: which items each shop sells
    train_indptr: np.ndarray  # (customers + 1,)
    train_items: np.ndarray  # (train interactions,)
    test_item: np.ndarray  # (customers,) the held-out item of each customer
    synthetic: bool = False
    customer_ids: np.ndarray | None = None  # the source's id of each customer (e.g. MovieLens userId)

    def __post_init__(self) -> None:
        n = len(self.shop_of)
        if len(self.train_indptr) != n + 1 or len(self.test_item) != n:
            raise DataError("interactions: per-customer arrays disagree in length")
        if self.catalogues.ndim != 2 or self.catalogues.shape[1] != self.num_items:
            raise DataError("interactions: catalogues must be a (shops, items) table")
        if n and not 0 <= int(self.shop_of.min()) <= int(self.shop_of.max()) < self.num_shops:
            raise DataError("interactions: a customer's shop has no catalogue")
        if n and not bool(self.catalogues[self.shop_of, self.test_item].all()):
            raise DataError("interactions: a held-out item is outside its shop's catalogue")

    @property
    def num_customers(self) -> int:
        return len(self.shop_of)

    @property
    def num_shops(self) -> int:
        return self.catalogues.shape[0]

    @property
    def num_train(self) -> int:
        return len(self.train_items)

    def customers_of(self, shop: int) -> np.ndarray:
        return np.flatnonzero(self.shop_of == shop)

    def train_matrix(self, customers: np.ndarray) -> np.ndarray:
        """Multi-hot (len(customers), items) float32 rows of the customers' training items."""
        rows = np.zeros((len(customers), self.num_items), dtype=np.float32)
        starts = self.train_indptr[customers]
        lengths = self.train_indptr[customers + 1] - starts
        row_ids = np.repeat(np.arange(len(customers)), lengths)
        first = np.cumsum(lengths) - lengths  # where each customer's run starts in the gather
        positions = np.arange(int(lengths.sum())) - np.repeat(first - starts, lengths)
        rows[row_ids, self.train_items[positions]] = 1.0
        return rows

    def describe(self) -> str:
        sizes = np.bincount(self.shop_of, minlength=self.num_shops)
        cat = self.catalogues.sum(axis=1)
        return (f"{self.name}: {self.num_shops} shops, {self.num_customers} customers "
                f"({sizes.min()}-{sizes.max()} a shop), {self.num_items} items "
                f"({cat.min()}-{cat.max()} in a shop's catalogue), "
                f"{self.num_train + self.num_customers} interactions")

    def as_dataset(self, name: str) -> Dataset:
        """The engine's view (registered as dataset ``name``): one training row per customer,
        grouped by shop.

        ``x`` is the customer id, ``y`` and ``groups`` the customer's shop; the test rows are the
        held-out (customer, item) pairs. The partition ``natural`` then gives every shop exactly
        its customers, and client sizes count customers.
        """
        ids = np.arange(self.num_customers, dtype=np.int64)[:, None]
        return Dataset(name, ids, self.shop_of.astype(np.int64), ids.copy(),
                       self.test_item.astype(np.int64), num_classes=self.num_items,
                       groups_train=self.shop_of.astype(np.int64))


def from_events(
    *,
    name: str,
    customers: np.ndarray,
    items: np.ndarray,
    shop_of: np.ndarray,
    catalogues: np.ndarray,
    order: np.ndarray | None = None,
    seed: int = 0,
    synthetic: bool = False,
) -> Interactions:
    """Build :class:`Interactions` from interaction events (customer, item), one per purchase.

    Repeated (customer, item) events count once. With ``order`` (a timestamp per event) each
    customer's latest item is held out; without it, one of their items drawn with ``seed``.
    Customers with fewer than ``MIN_INTERACTIONS`` distinct items are dropped; customer ids are
    renumbered densely, in order.
    """
    customers = np.asarray(customers, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if len(customers) != len(items):
        raise DataError("interactions: customers and items differ in length")
    key = order if order is not None else np.random.default_rng(seed).random(len(items))
    # sort by customer, then by key: the held-out item is each customer's last after the sort
    perm = np.lexsort((np.asarray(key), customers))
    c, i = customers[perm], items[perm]
    # keep the last occurrence of each (customer, item): stable under the key order
    pair = c * (int(items.max()) + 1 if len(items) else 1) + i
    _, last_from_end = np.unique(pair[::-1], return_index=True)
    keep = np.sort(len(pair) - 1 - last_from_end)
    c, i = c[keep], i[keep]
    ids, counts = np.unique(c, return_counts=True)
    kept_ids = ids[counts >= MIN_INTERACTIONS]
    mask = np.isin(c, kept_ids)
    c, i = c[mask], i[mask]
    if not len(c):
        raise DataError(f"{name}: no customer has {MIN_INTERACTIONS} or more distinct items")
    dense = np.searchsorted(kept_ids, c)
    counts = np.bincount(dense)
    ends = np.cumsum(counts)
    test_pos = ends - 1
    is_train = np.ones(len(c), dtype=bool)
    is_train[test_pos] = False
    train_counts = counts - 1
    indptr = np.concatenate([[0], np.cumsum(train_counts)]).astype(np.int64)
    return Interactions(
        name=name, num_items=catalogues.shape[1], shop_of=np.asarray(shop_of)[kept_ids].astype(np.int64),
        catalogues=np.asarray(catalogues, dtype=bool), train_indptr=indptr,
        train_items=i[is_train].astype(np.int64), test_item=i[test_pos].astype(np.int64),
        synthetic=synthetic, customer_ids=kept_ids,
    )
