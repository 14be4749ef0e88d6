"""Load MovieLens-format ratings a user already has, and split the users into shops.

MovieLens may not be redistributed, so nothing here downloads it; point ``--data-dir`` at a
folder holding one of

- ``ratings.csv`` (ml-latest, ml-latest-small, ml-20m, ml-25m): header
  ``userId,movieId,rating,timestamp``, comma-separated;
- ``u.data`` (ml-100k): ``user item rating timestamp``, tab-separated, no header;

directly, or in a sub-folder (``ml-100k/u.data``, ``movielens/ratings.csv``, ...). Every rating
counts as one implicit interaction (the customer watched the movie), as in He et al.'s NCF
evaluation; ``min_rating`` keeps only ratings at or above it. Each user's latest movie is held out.

Shops: users are assigned to ``shops`` shops with seeded, unequal sizes (Dirichlet(2) shares);
every shop sells the ``shared_fraction`` most-rated movies and each other movie with probability
``catalogue_fraction``; a user's interactions outside their shop's catalogue are dropped (they
bought elsewhere), and so are users left with fewer than three.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from federation.recsys.interactions import Interactions, from_events
from secagg.errors import DataError

FILE_NAMES = ("ratings.csv", "u.data")


def find_ratings(data_dir: str | Path) -> Path:
    """The MovieLens ratings file under ``data_dir`` (itself or one level down), or DataError."""
    root = Path(data_dir)
    candidates = [root / name for name in FILE_NAMES]
    if root.is_dir():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            candidates += [sub / name for name in FILE_NAMES]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"no MovieLens ratings under {root}: expected ratings.csv (userId,movieId,rating,"
                    "timestamp) or u.data (ml-100k) there or in a sub-folder such as ml-100k/")


def read_ratings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, rating, timestamp) arrays from ``ratings.csv`` or ``u.data``."""
    path = Path(path)
    try:
        if path.name == "u.data":
            table = np.loadtxt(path, dtype=np.float64, delimiter="\t", ndmin=2)
        else:
            with open(path, encoding="utf-8") as fh:
                header = fh.readline().strip().lower().split(",")
            if header[:4] != ["userid", "movieid", "rating", "timestamp"]:
                raise DataError(f"{path}: expected the header userId,movieId,rating,timestamp, got {header}")
            table = np.loadtxt(path, dtype=np.float64, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path} is not a MovieLens ratings file: {exc}") from None
    if table.shape[1] != 4 or not len(table):
        raise DataError(f"{path}: expected 4 columns (user, item, rating, timestamp) and at least one row")
    return (table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2], table[:, 3])


def load_movielens(
    data_dir: str | Path,
    *,
    shops: int,
    seed: int = 0,
    min_rating: float | None = None,
    shared_fraction: float = 0.2,
    catalogue_fraction: float = 0.6,
) -> Interactions:
    """MovieLens ratings under ``data_dir`` as implicit feedback split into ``shops`` shops."""
    path = find_ratings(data_dir)
    users, movies, ratings, stamps = read_ratings(path)
    if min_rating is not None:
        keep = ratings >= min_rating
        users, movies, stamps = users[keep], movies[keep], stamps[keep]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x3713]))
    user_ids, user_idx = np.unique(users, return_inverse=True)
    movie_ids, item = np.unique(movies, return_inverse=True)
    n_items = len(movie_ids)
    shares = rng.dirichlet([2.0] * shops)
    shop_of_user = rng.choice(shops, size=len(user_ids), p=shares)
    popularity_rank = np.empty(n_items, dtype=np.int64)
    popularity_rank[np.argsort(-np.bincount(item, minlength=n_items), kind="stable")] = np.arange(n_items)
    head = popularity_rank < round(shared_fraction * n_items)
    catalogues = (rng.random((shops, n_items)) < catalogue_fraction) | head
    sold = catalogues[shop_of_user[user_idx], item]
    data = from_events(
        name=f"MovieLens ({path.parent.name}/{path.name}) in {shops} shops", customers=user_idx[sold],
        items=item[sold], shop_of=shop_of_user, catalogues=catalogues, order=stamps[sold], seed=seed,
    )
    return replace(data, customer_ids=user_ids[data.customer_ids])


def write_ratings_csv(path: str | Path, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                      stamps: np.ndarray) -> None:
    """Write ratings in MovieLens' ``ratings.csv`` format (for tests and for exporting)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("userId,movieId,rating,timestamp\n")
        fh.writelines(f"{int(u)},{int(i)},{float(r):.1f},{int(t)}\n"
                      for u, i, r, t in zip(users, items, ratings, stamps))
