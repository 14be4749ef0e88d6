"""Small dataset readers used by the DP benchmarks and tests (no downloads).

MNIST is read from the four IDX files (``*-idx?-ubyte.gz``) of LeCun et al. with
``gzip`` + ``numpy``; the folder may be read-only.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from secagg.errors import DataError

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / "raw" / name, data_dir / "mnist" / "raw" / name):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"MNIST file {name} not found under {data_dir} (looked in ., raw/, mnist/raw/); "
        f"expected the four files {sorted(MNIST_FILES.values())}"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed unsigned-byte IDX file, the format of MNIST and Fashion-MNIST."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def mnist_available(data_dir: str | Path) -> bool:
    try:
        for name in MNIST_FILES.values():
            _find(Path(data_dir), name)
    except DataError:
        return False
    return True


def load_mnist(data_dir: str | Path) -> dict[str, np.ndarray]:
    """Return ``train_images`` (60000, 28, 28) float32 normalised, ``train_labels`` int64, etc."""
    data_dir = Path(data_dir)
    out: dict[str, np.ndarray] = {}
    for key, name in MNIST_FILES.items():
        arr = read_idx(_find(data_dir, name))
        if key.endswith("images"):
            out[key] = ((arr.astype(np.float32) / 255.0) - MNIST_MEAN) / MNIST_STD
        else:
            out[key] = arr.astype(np.int64)
    return out
