"""A seeded generator of *synthetic* implicit-feedback data for federated shops.

No ratings dataset ships with the packages this project depends on, and MovieLens may not be
redistributed, so the shops scenario runs by default on data drawn from this model (always named
"synthetic shops" where it is shown). The model, with the parameters of :class:`SyntheticShops`:

1. **Items.** ``num_items`` items, each with latent factors ``v_i ~ N(0, I / latent_dim)`` and a
   popularity rank; the log-popularity of the item of rank r (1 = most popular) is
   ``-popularity_exponent * log(r)`` (a Zipf law: a few blockbusters, a long tail).
2. **Catalogues.** The ``shared_fraction`` most popular items are sold by every shop; every other
   item is sold by each shop independently with probability ``catalogue_fraction``. Catalogues
   therefore overlap on the head and differ on the tail.
3. **Customers.** Shop s has a number of customers drawn log-normally around
   ``customers_per_shop`` (spread ``size_spread``; at least ``min_customers``) and a taste offset
   ``m_s ~ N(0, shop_shift^2 I)``; its customers have factors ``u ~ N(m_s, I)``. Shops differ in
   size and in taste, not only in catalogue.
4. **Purchases.** A customer buys ``3 + Poisson(mean_interactions - 3)`` distinct items of their
   shop's catalogue, drawn without replacement with probabilities proportional to
   ``exp(taste_strength * u . v_i + log-popularity_i)`` (Gumbel top-k sampling).

Presets (:data:`PRESETS`): ``default`` is :class:`SyntheticShops` as it stands (8 shops of about
430 customers, 1,000 items; the demo's data); ``many-customers`` is 16 shops of about 1,400
customers (22,124 in all, 874-2,027 a shop), 300 items and 5 purchases a customer on average --
the size at which customer-level DP noise on the item table becomes small against the signal;
``small-shops`` is 50 shops of 200 customers (10,000 in all), 300 items (188-218 in a shop's
catalogue), 6 purchases a customer on average and shop tastes closer together (``shop_shift`` 0.3):
every shop alone is short of purchases per item, the federation as a whole is not -- the case
federating is for (docs/recommendation.md has the figures).

Every draw comes from ``numpy.random.default_rng(seed)``: the same seed gives the same data,
byte for byte. This is public, simulated data; nothing secret is drawn here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.recsys.interactions import Interactions, from_events
from secagg.errors import ConfigError


@dataclass(frozen=True)
class SyntheticShops:
    """Parameters of the synthetic shops (see the module docstring for the model)."""

    num_shops: int = 8
    customers_per_shop: int = 500
    size_spread: float = 0.25
    min_customers: int = 250
    num_items: int = 1000
    latent_dim: int = 8
    popularity_exponent: float = 0.8
    shared_fraction: float = 0.2
    catalogue_fraction: float = 0.6
    shop_shift: float = 0.5
    taste_strength: float = 4.0
    mean_interactions: float = 8.0

    def __post_init__(self) -> None:
        problems = []
        if self.num_shops < 1 or self.customers_per_shop < 1 or self.min_customers < 1:
            problems.append("num_shops, customers_per_shop and min_customers must be >= 1")
        if self.num_items < 10 or self.latent_dim < 1:
            problems.append("num_items must be >= 10 and latent_dim >= 1")
        if not (0 <= self.shared_fraction <= 1 and 0 < self.catalogue_fraction <= 1):
            problems.append("shared_fraction must be in [0, 1] and catalogue_fraction in (0, 1]")
        if self.mean_interactions < 3:
            problems.append("mean_interactions must be >= 3 (two to train on, one held out)")
        if min(self.size_spread, self.shop_shift, self.taste_strength, self.popularity_exponent) < 0:
            problems.append("size_spread, shop_shift, taste_strength and popularity_exponent must be >= 0")
        if problems:
            raise ConfigError("synthetic shops: " + "; ".join(problems))


def generate_shops(spec: SyntheticShops | None = None, *, seed: int = 0) -> Interactions:
    """Draw synthetic shops from ``spec`` (defaults: 8 shops, ~4,000 customers, 1,000 items)."""
    spec = spec or SyntheticShops()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5405]))
    k, n_items = spec.latent_dim, spec.num_items
    item_factors = rng.normal(0.0, 1.0 / np.sqrt(k), size=(n_items, k))
    rank = rng.permutation(n_items) + 1  # item i has popularity rank rank[i]
    log_pop = -spec.popularity_exponent * np.log(rank)

    head = rank <= round(spec.shared_fraction * n_items)
    catalogues = (rng.random((spec.num_shops, n_items)) < spec.catalogue_fraction) | head
    sizes = np.maximum(spec.min_customers, np.round(
        spec.customers_per_shop * rng.lognormal(0.0, spec.size_spread, spec.num_shops)
        * np.exp(-spec.size_spread**2 / 2))).astype(int)  # mean customers_per_shop
    tastes = rng.normal(0.0, spec.shop_shift, size=(spec.num_shops, k))

    customers, items, shop_of = [], [], []
    next_id = 0
    for shop in range(spec.num_shops):
        cat = np.flatnonzero(catalogues[shop])
        users = tastes[shop] + rng.normal(size=(sizes[shop], k))
        logits = spec.taste_strength * users @ item_factors[cat].T + log_pop[cat]
        counts = np.minimum(3 + rng.poisson(spec.mean_interactions - 3, sizes[shop]), len(cat))
        gumbel = logits + rng.gumbel(size=logits.shape)
        order = np.argsort(-gumbel, axis=1)
        for row in range(sizes[shop]):
            bought = cat[order[row, :counts[row]]]
            customers.append(np.full(len(bought), next_id))
            items.append(bought)
            shop_of.append(shop)
            next_id += 1
    return from_events(
        name=f"synthetic shops (seed {seed})", customers=np.concatenate(customers),
        items=np.concatenate(items), shop_of=np.asarray(shop_of), catalogues=catalogues,
        seed=seed, synthetic=True,
    )


PRESETS = {
    "default": SyntheticShops(),
    "many-customers": SyntheticShops(num_shops=16, customers_per_shop=1200, min_customers=600, num_items=300,
                                     mean_interactions=5.0),
    "small-shops": SyntheticShops(num_shops=50, customers_per_shop=200, min_customers=200, size_spread=0.0,
                                  num_items=300, mean_interactions=6.0, shop_shift=0.3),
}
