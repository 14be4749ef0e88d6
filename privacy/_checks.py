"""Parameter checks shared by the privacy package.

Every check raises :class:`secagg.errors.ConfigError` with a message that names the
parameter, the value received and what to change. Checks never use ``assert``.
"""

from __future__ import annotations

import math
import numbers

from secagg.errors import ConfigError


def check_noise_multiplier(value: float, *, name: str = "noise_multiplier") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{name} must be a real number >= 0, got {value!r}")
    if value < 0 or math.isinf(value):
        raise ConfigError(
            f"{name} must be a finite number >= 0 (the noise std divided by the clipping norm), "
            f"got {value!r}; use a positive value such as 1.0"
        )
    return float(value)


def check_sample_rate(value: float, *, name: str = "sample_rate") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{name} must be a real number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ConfigError(
            f"{name} must lie in (0, 1] (the probability that a record or client takes part in "
            f"one step), got {value!r}; e.g. batch_size / dataset_size"
        )
    return float(value)


def check_steps(value: int, *, name: str = "steps") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return int(value)


#: Largest delta accepted whatever the dataset: a delta this large is a real chance of total
#: failure, and accountants report meaningless (even negative) epsilons near it.
MAX_DELTA = 0.1


def check_delta(value: float, *, dataset_size: int | None = None, name: str = "delta") -> float:
    """``delta`` in (0, 0.1), and below ``1/dataset_size`` when the size is known.

    ``dataset_size`` is the number of units the guarantee protects (records of the largest
    dataset for record-level DP, users for user-level DP).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{name} must be a real number in (0, 1), got {value!r}")
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"{name} must lie in (0, 1), got {value!r}; a common choice is 1e-5 or less than "
            "1 / (number of records or users)"
        )
    if dataset_size is not None:
        n = check_positive_int(dataset_size, name="dataset_size")
        if value >= 1.0 / n:
            raise ConfigError(
                f"{name}={value!r} is >= 1/n = 1/{n}: such a delta allows releasing a whole record "
                f"outright; choose delta < {1.0 / n:.3g} (e.g. {_suggest_delta(n):.0e})"
            )
    if value >= MAX_DELTA:
        raise ConfigError(
            f"{name}={value!r} is too large to be a privacy guarantee (it must be below "
            f"{MAX_DELTA:g} and below 1/number of records or users); choose e.g. 1e-5"
        )
    return float(value)


def _suggest_delta(n: int) -> float:
    return 10.0 ** math.floor(math.log10(1.0 / n) - 1)


def check_epsilon(value: float, *, name: str = "epsilon") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{name} must be a real number > 0, got {value!r}")
    if value <= 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}; e.g. 3.0")
    return float(value)


def check_positive_int(value: int, *, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_positive(value: float, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{name} must be a real number > 0, got {value!r}")
    if value <= 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
