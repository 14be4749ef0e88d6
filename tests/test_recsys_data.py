"""Recommendation data: the synthetic generator, leave-one-out, the MovieLens loader, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from federation.recsys.interactions import from_events
from federation.recsys.metrics import held_out_ranks, rank_customers
from federation.recsys.movielens import find_ratings, load_movielens, write_ratings_csv
from federation.recsys.synthetic import SyntheticShops, generate_shops
from secagg.errors import ConfigError, DataError

SMALL = SyntheticShops(num_shops=4, customers_per_shop=60, min_customers=30, num_items=120)


def test_generator_is_seeded_and_labelled_synthetic():
    a, b, c = generate_shops(SMALL, seed=3), generate_shops(SMALL, seed=3), generate_shops(SMALL, seed=4)
    assert a.synthetic and "synthetic" in a.name and "synthetic" in a.describe()
    for field in ("shop_of", "catalogues", "train_indptr", "train_items", "test_item"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_items, c.train_items)


def test_generator_shapes_shops_catalogues_and_popularity():
    data = generate_shops(SMALL, seed=0)
    assert data.num_shops == 4 and data.num_items == 120
    head = data.catalogues.all(axis=0)
    assert head.sum() >= int(0.2 * 120)  # the shared head is sold everywhere
    assert not data.catalogues.all()  # the tails differ
    # every training and held-out item is in the customer's shop's catalogue
    shop_of_train = np.repeat(data.shop_of, np.diff(data.train_indptr))
    assert data.catalogues[shop_of_train, data.train_items].all()
    assert data.catalogues[data.shop_of, data.test_item].all()
    # popularity skew: the 10 % most bought items take far more than 10 % of the purchases
    counts = np.sort(np.bincount(data.train_items, minlength=data.num_items))[::-1]
    assert counts[:12].sum() > 0.25 * counts.sum()
    # every customer keeps at least two training items and one held out
    assert np.diff(data.train_indptr).min() >= 2


def test_bad_generator_parameters_are_a_config_error():
    with pytest.raises(ConfigError, match="mean_interactions"):
        SyntheticShops(mean_interactions=2)


def test_leave_one_out_holds_out_the_latest_and_deduplicates():
    customers = np.array([7, 7, 7, 7, 9, 9, 9, 5])
    items = np.array([1, 2, 1, 3, 0, 4, 2, 1])
    stamps = np.array([10, 30, 40, 20, 5, 1, 3, 0])
    data = from_events(name="t", customers=customers, items=items, shop_of=np.zeros(10, int),
                       catalogues=np.ones((1, 5), bool), order=stamps)
    # customer 5 has one item: dropped; 7 -> ids 0, 9 -> id 1 (dense, in order)
    assert data.num_customers == 2
    assert data.customer_ids.tolist() == [7, 9]
    assert data.test_item.tolist() == [1, 0]  # latest: item 1 at t=40, item 0 at t=5
    train0 = sorted(data.train_items[data.train_indptr[0]:data.train_indptr[1]].tolist())
    assert train0 == [2, 3]  # item 1 bought twice counts once, and it is the held-out one
    assert data.train_matrix(np.array([1, 0])).tolist() == [[0, 0, 1, 0, 1], [0, 0, 1, 1, 0]]


def _ratings(tmp_path, seed=0):
    """A small MovieLens-format file generated from the synthetic model (never real data)."""
    data = generate_shops(SMALL, seed=seed)
    users = np.repeat(np.arange(data.num_customers), np.diff(data.train_indptr) + 1)
    items, stamps = [], []
    for c in range(data.num_customers):
        bought = data.train_items[data.train_indptr[c]:data.train_indptr[c + 1]].tolist() + [data.test_item[c]]
        items += bought
        stamps += list(range(1000 * c, 1000 * c + len(bought)))
    ratings = np.random.default_rng(seed).integers(1, 6, len(users)).astype(float)
    return users + 1, np.asarray(items) + 10, ratings, np.asarray(stamps)


def test_movielens_ratings_csv_is_loaded_and_split_into_shops(tmp_path):
    users, items, ratings, stamps = _ratings(tmp_path)
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    write_ratings_csv(folder / "ratings.csv", users, items, ratings, stamps)
    assert find_ratings(tmp_path) == folder / "ratings.csv"
    data = load_movielens(tmp_path, shops=3, seed=1)
    assert data.num_shops == 3 and not data.synthetic and "MovieLens" in data.name
    assert data.num_items == len(np.unique(items))
    assert set(np.unique(data.shop_of)) == {0, 1, 2}
    assert data.catalogues[data.shop_of, data.test_item].all()
    # the held-out item is each kept user's latest purchase within their shop's catalogue
    movie_ids = np.unique(items)
    for c in range(0, data.num_customers, 7):
        mine = users == data.customer_ids[c]
        sold = data.catalogues[data.shop_of[c], np.searchsorted(movie_ids, items[mine])]
        latest = items[mine][sold][np.argmax(stamps[mine][sold])]
        assert movie_ids[data.test_item[c]] == latest


def test_movielens_u_data_is_loaded(tmp_path):
    users, items, ratings, stamps = _ratings(tmp_path, seed=2)
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    rows = np.stack([users, items, ratings.astype(int), stamps], axis=1)
    np.savetxt(folder / "u.data", rows, fmt="%d", delimiter="\t")
    data = load_movielens(tmp_path, shops=2, seed=0)
    assert data.num_shops == 2 and data.num_customers > 0 and "u.data" in data.name


def test_missing_or_malformed_movielens_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="ratings.csv"):
        load_movielens(tmp_path, shops=2)
    (tmp_path / "ratings.csv").write_text("user,item\n1,2\n")
    with pytest.raises(DataError, match="userId,movieId,rating,timestamp"):
        load_movielens(tmp_path, shops=2)


def test_metrics_rank_against_the_full_catalogue_with_ties_against_the_model():
    data = from_events(name="t", customers=np.array([0, 0, 0]), items=np.array([0, 1, 2]),
                       shop_of=np.zeros(1, int), catalogues=np.array([[1, 1, 1, 1, 1, 0]], bool),
                       order=np.array([0, 1, 2]))
    assert data.test_item.tolist() == [2]
    # items 0, 1 bought in training and item 5 outside the catalogue are not ranked
    scores = np.array([[9.0, 9.0, 1.0, 2.0, 0.5, 50.0]])
    rank, _ = held_out_ranks(scores, np.array([0]), data)
    assert rank.tolist() == [1]  # only item 3 scores higher
    tied = np.array([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert held_out_ranks(tied, np.array([0]), data)[0].tolist() == [2]  # ties count against it
    result = rank_customers(lambda rows: scores[rows], np.array([0]), data, k=1)
    assert result.hr == 0.0 and result.ndcg == 0.0
    result = rank_customers(lambda rows: scores[rows], np.array([0]), data, k=10)
    assert result.hr == 1.0 and result.ndcg == pytest.approx(1 / np.log2(3))
