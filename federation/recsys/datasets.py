"""The recommendation datasets by name: ``shops`` (synthetic) and ``movielens`` (your files)."""

from __future__ import annotations

from pathlib import Path

from federation.recsys.interactions import Interactions
from secagg.errors import ConfigError, DataError


def load_interactions(name: str, data_dir: str | Path | None, *, shops: int, seed: int) -> Interactions:
    """``shops``: :func:`~federation.recsys.synthetic.generate_shops` with ``shops`` shops;
    ``movielens``: :func:`~federation.recsys.movielens.load_movielens` from ``data_dir``."""
    if name == "shops":
        from federation.recsys.synthetic import SyntheticShops, generate_shops

        return generate_shops(SyntheticShops(num_shops=shops), seed=seed)
    if name == "movielens":
        from federation.recsys.movielens import load_movielens

        if data_dir is None:
            raise DataError("dataset 'movielens' needs --data-dir pointing at a folder with ratings.csv "
                            "or u.data (MovieLens is not redistributed; use the copy you have)")
        return load_movielens(data_dir, shops=shops, seed=seed)
    raise ConfigError(f"unknown recommendation dataset {name!r}; choose 'shops' or 'movielens'")
