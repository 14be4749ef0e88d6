"""Federated recommendation: shops train one item-embedding table together while every shop's
customer embeddings stay on the shop.

Modules, one job each:

- :mod:`federation.recsys.interactions` -- implicit-feedback data held per customer, the
  leave-one-out split, and the view the round engine partitions (one row per customer);
- :mod:`federation.recsys.synthetic` -- the documented, seeded generator of *synthetic* shops;
- :mod:`federation.recsys.movielens` -- a loader for MovieLens files a user already has
  (``ratings.csv`` or ``u.data``), split into shops;
- :mod:`federation.recsys.model` -- matrix factorisation with a softmax over the shop's
  catalogue, trained in numpy, with customer-level DP-SGD (per-customer clipping + noise);
- :mod:`federation.recsys.metrics` -- HR@10 and NDCG@10 (leave-one-out, full ranking);
- :mod:`federation.recsys.baselines` -- the central (pooled) model, each shop alone, popularity;
- :mod:`federation.recsys.federation` -- :class:`ShopsFederation`, the round engine with the
  shops' private state (``secagg demo --scenario shops``).

The theory of operation is in docs/recommendation.md. Importing this package is cheap; torch
loads only with the federation module.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Interactions", "ShopsFederation", "SyntheticShops", "generate_shops", "load_movielens"]

_LAZY = {
    "ShopsFederation": "federation.recsys.federation",
    "Interactions": "federation.recsys.interactions",
    "SyntheticShops": "federation.recsys.synthetic",
    "generate_shops": "federation.recsys.synthetic",
    "load_movielens": "federation.recsys.movielens",
}

RECSYS_DATASETS = ("shops", "movielens")


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'federation.recsys' has no attribute {name!r}")
