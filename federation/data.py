"""Datasets and partitioners for federated simulations, all readable without network access.

Datasets:

- ``breast_cancer`` (scikit-learn's bundled copy; the hospitals demo),
- ``digits`` (scikit-learn's bundled 8x8 digits; the IoT demo's many small devices),
- ``finance``: UCI "default of credit card clients" (``finance/default_of_credit_card_clients.csv.gz``
  under ``--data-dir``; the banks demo),
- ``mnist`` / ``fashion_mnist``: the four standard IDX ``.gz`` files under ``mnist/raw/`` and
  ``fashion_mnist/raw/``, read with gzip + numpy,
- ``femnist``: LEAF's FEMNIST subset ``femnist/femnist.npz`` with a writer id per sample,
- ``shops`` (synthetic) / ``movielens`` (``ratings.csv`` or ``u.data`` under ``--data-dir``):
  implicit-feedback recommendation data, one row per customer; they are trained by
  :class:`federation.recsys.ShopsFederation` and loaded by :mod:`federation.recsys.datasets`.

Partitioners (:func:`partition`): ``iid``, ``dirichlet`` (label skew with concentration ``alpha``,
Hsu et al. 2019) and ``natural`` (one client per writer, FEMNIST only).

A missing file raises :class:`secagg.errors.DataError` naming every file expected and where.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privacy.datasets import read_idx
from secagg.errors import ConfigError, DataError

DATASETS = ("breast_cancer", "digits", "finance", "mnist", "fashion_mnist", "femnist", "shops", "movielens")
PARTITIONS = ("iid", "dirichlet", "natural")

FINANCE_FILE = "finance/default_of_credit_card_clients.csv.gz"
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FEMNIST_FILE = "femnist/femnist.npz"
_IMAGE_FOLDERS = {"mnist": "mnist/raw", "fashion_mnist": "fashion_mnist/raw"}


@dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory as float32 features and int64 labels.

    ``groups_train`` is the natural client of each training sample (FEMNIST's writer), or None.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    groups_train: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def default_data_dir() -> Path | None:
    """``../shared/data`` next to the repository checkout, when it exists."""
    candidate = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def required_files(name: str) -> tuple[str, ...]:
    """Files (relative to the data dir) a dataset needs; empty for the bundled ones."""
    if name in ("breast_cancer", "digits", "shops"):
        return ()
    if name == "movielens":  # one of several layouts: checked by federation.recsys.movielens
        return ()
    if name == "finance":
        return (FINANCE_FILE,)
    if name in _IMAGE_FOLDERS:
        return tuple(f"{_IMAGE_FOLDERS[name]}/{f}" for f in IDX_FILES)
    if name == "femnist":
        return (FEMNIST_FILE,)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def check_available(name: str, data_dir: str | Path | None) -> None:
    """Raise DataError (before any training) if a dataset's files are not under ``data_dir``."""
    if name == "movielens":
        from federation.recsys.datasets import load_interactions

        if data_dir is None:
            load_interactions(name, None, shops=1, seed=0)  # raises the DataError that says what to pass
        from federation.recsys.movielens import find_ratings

        find_ratings(data_dir)
        return
    files = required_files(name)
    if not files:
        return
    if data_dir is None:
        raise DataError(
            f"dataset {name!r} needs a data directory holding {', '.join(files)}; "
            "pass --data-dir (or set data_dir in the config)"
        )
    root = Path(data_dir)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"dataset {name!r}: missing {', '.join(missing)} under {root}; expected the files "
            f"{', '.join(files)} (see the README of that folder for where they come from)"
        )


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0) -> Dataset:
    """Load a dataset by name; tabular ones are split 80/20 (stratified) and standardised.

    ``seed`` fixes the train/test split of the tabular datasets (public, not secret).
    """
    check_available(name, data_dir)
    if name in ("shops", "movielens"):
        raise ConfigError(f"dataset {name!r} holds recommendation data (customers and items, not labels): "
                          "train it with federation.recsys.ShopsFederation (secagg demo --scenario shops)")
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return _tabular(name, bunch.data, bunch.target, num_classes=2, seed=seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return _tabular(name, bunch.data, bunch.target, num_classes=10, seed=seed)
    root = Path(data_dir)  # type: ignore[arg-type]  # check_available guarantees it
    if name == "finance":
        table = np.loadtxt(root / FINANCE_FILE, delimiter=",", skiprows=1, dtype=np.float64)
        x, y = table[:, 1:24], table[:, 24].astype(np.int64)
        # Amounts are heavy-tailed: a signed log keeps standardised features in a sane range.
        x = np.sign(x) * np.log1p(np.abs(x))
        return _tabular(name, x, y, num_classes=2, seed=seed)
    if name in _IMAGE_FOLDERS:
        folder = root / _IMAGE_FOLDERS[name]
        x_tr, y_tr, x_te, y_te = (read_idx(folder / f) for f in IDX_FILES)
        return Dataset(name, _images(x_tr), y_tr.astype(np.int64), _images(x_te), y_te.astype(np.int64), 10)
    # femnist
    with np.load(root / FEMNIST_FILE, allow_pickle=False) as npz:
        # LEAF polarity is white background = 255; flip to MNIST polarity (ink bright).
        x_tr = _images(255 - npz["x_train"])
        x_te = _images(255 - npz["x_test"])
        return Dataset(
            name, x_tr, npz["y_train"].astype(np.int64), x_te, npz["y_test"].astype(np.int64), 62,
            groups_train=npz["writer_train"].astype(np.int64),
        )


def _tabular(name: str, x: np.ndarray, y: np.ndarray, *, num_classes: int, seed: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)

    return Dataset(name, norm(x_tr), y_tr.astype(np.int64), norm(x_te), y_te.astype(np.int64), num_classes)


def _images(x: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28), normalised with MNIST's mean and std."""
    return ((x.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None, :, :]


def partition(
    dataset: Dataset,
    *,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    min_size: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split the training set into ``num_clients`` index arrays.

    ``dirichlet``: for every class, draw client proportions from Dir(alpha) (smaller alpha, more
    skew) and redraw until every client holds at least ``min_size`` samples.
    ``natural``: one client per writer; with more writers than clients, the ``num_clients``
    writers with most samples are kept; with fewer, it is an error.
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    n = len(dataset.y_train)
    if num_clients * min_size > n:
        raise ConfigError(
            f"{num_clients} clients need at least {num_clients * min_size} training samples; "
            f"{dataset.name} has {n}"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "dirichlet":
        if alpha <= 0:
            raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
        for _ in range(1000):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for label in np.unique(dataset.y_train):
                idx = rng.permutation(np.flatnonzero(dataset.y_train == label))
                cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
                for client, chunk in enumerate(np.split(idx, cuts)):
                    parts[client].extend(chunk.tolist())
            if min(len(p) for p in parts) >= min_size:
                return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
        raise ConfigError(
            f"dirichlet(alpha={alpha}) could not give all {num_clients} clients {min_size} samples; "
            "raise alpha or lower num_clients"
        )
    if scheme == "natural":
        if dataset.groups_train is None:
            raise ConfigError(
                f"partition 'natural' needs per-writer groups; {dataset.name} has none (use femnist)"
            )
        writers, counts = np.unique(dataset.groups_train, return_counts=True)
        if len(writers) < num_clients:
            raise ConfigError(
                f"{dataset.name} has {len(writers)} writers, fewer than num_clients={num_clients}"
            )
        chosen = writers[np.argsort(-counts, kind="stable")[:num_clients]]
        return [np.flatnonzero(dataset.groups_train == w) for w in np.sort(chosen)]
    raise ConfigError(f"unknown partition {scheme!r}; choose one of {', '.join(PARTITIONS)}")
