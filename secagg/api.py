"""`secagg.aggregate`: one entry point for every protection (masking or CKKS).

It runs the real protocol in process (real keys, real shares, real masks or real CKKS
ciphertexts), so what it returns is what a deployed server would learn.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from secagg.errors import ConfigError, InputError
from secagg.rounds import RoundOutcome

PROTECTIONS = ("masking", "ckks")
#: masking options and their defaults: with protection="ckks" a value other than the default
#: would be silently ignored, so it is an error instead
_MASKING_ONLY = {"graph": "complete", "threshold": None, "clip_mode": "l2", "bits": 32, "scale": None,
                 "seed": None}


def aggregate(
    updates: np.ndarray,
    *,
    protection: str = "masking",
    graph: str = "complete",
    threshold: int | None = None,
    dropouts: Mapping[str, Sequence[int]] | None = None,
    clip: float | None = None,
    clip_mode: str = "l2",
    bits: int = 32,
    scale: float | None = None,
    seed: int | None = None,
    weights: Sequence[float] | None = None,
    protocol: str | None = None,
    **protocol_options,
) -> RoundOutcome:
    """Securely sum the rows of ``updates`` (an (n, d) float array) over the surviving clients.

    ``dropouts`` maps a stage name to the client indices that drop at that stage. For
    masking the stages are "advertise", "share", "masked_input", "consistency", "unmask";
    for ckks a client that drops before uploading is simply left out of the sum.
    ``seed`` makes the decoded result reproducible by fixing the (non-secret) stochastic
    rounding; keys, masks and shares always come from the OS CSPRNG. ``protection`` is
    "masking" (pairwise masks) or "ckks" (homomorphic encryption); ``protocol=`` is its old name.
    ``processes=2`` (masking) runs the simulated clients in two worker processes: the same sum,
    bit for bit, in less wall time at hundreds of clients (call it under an
    ``if __name__ == "__main__":`` guard; see :func:`secagg.protocol.simulate.aggregate_masking`).
    """
    if protocol is not None:
        warnings.warn(f"aggregate(protocol={protocol!r}) is now aggregate(protection={protocol!r}) (the name "
                      "the experiment config and `secagg run --protection` use); `protocol=` will be removed",
                      FutureWarning, stacklevel=2)
        protection = protocol
    if protection not in PROTECTIONS:
        raise ConfigError(f"unknown protection {protection!r}; choose one of {', '.join(PROTECTIONS)}")
    n = _check_matrix(updates)
    _check_dropouts(dropouts)
    _check_weights(weights, n)
    if protection == "masking":
        from secagg.protocol.simulate import aggregate_masking

        _check_options(aggregate_masking, protection, protocol_options)
        _check_threshold(threshold, n)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ConfigError(f"seed must be an integer (it fixes the stochastic rounding), got {seed!r}")
        return aggregate_masking(
            updates, graph=graph, threshold=threshold, dropouts=dropouts, clip=clip,
            clip_mode=clip_mode, bits=bits, scale=scale, seed=seed, weights=weights,
            **protocol_options,
        )
    given = dict(graph=graph, threshold=threshold, clip_mode=clip_mode, bits=bits, scale=scale, seed=seed)
    wrong = [k for k, default in _MASKING_ONLY.items() if given[k] != default]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} {'is a masking option' if len(wrong) == 1 else 'are masking options'}"
                          " that protection='ckks' does not use; remove it or use protection='masking'")
    from secagg.ckks import aggregate_ckks

    _check_options(aggregate_ckks, protection, protocol_options)
    return aggregate_ckks(updates, dropouts=dropouts, clip=clip, weights=weights, **protocol_options)


def _check_matrix(updates: object) -> int:
    """The number of rows; ragged, non-numeric and complex inputs are InputErrors."""
    try:
        matrix = np.asarray(updates)
    except (TypeError, ValueError):
        raise InputError("updates are ragged or not numbers; pass an (n_clients, dim) array with one "
                         "equal-length row per client") from None
    if matrix.dtype == object or not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == bool):
        raise InputError("updates are ragged or not numbers; pass an (n_clients, dim) array with one "
                         "equal-length row per client")
    if np.iscomplexobj(matrix):
        raise InputError("updates are complex; secure aggregation sums real vectors: pass the real and "
                         "imaginary parts as separate coordinates (np.concatenate([u.real, u.imag], axis=1))")
    if matrix.ndim != 2:
        raise InputError(f"updates must be a 2-D (n_clients, dim) array, got shape {matrix.shape}")
    return int(matrix.shape[0])


def _check_threshold(threshold: object, n: int) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral):
        raise ConfigError(f"threshold must be a whole number of clients, got {threshold!r}")
    if not 2 <= threshold <= n:
        raise ConfigError(f"threshold={threshold} must be between 2 and the number of clients ({n}): it is "
                          "how many clients must survive to unmask the sum")


def _check_dropouts(dropouts: object) -> None:
    if dropouts is None:
        return
    example = "e.g. dropouts={'masked_input': [1, 2]}"
    if not isinstance(dropouts, Mapping):
        raise ConfigError(f"dropouts must map a stage name to the client rows dropping there, {example}; "
                          f"got {type(dropouts).__name__}")
    for stage, rows in dropouts.items():
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or any(
                isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in rows):
            raise ConfigError(f"dropouts[{stage!r}] must be a list of client rows (integers), {example}")


def _check_weights(weights: object, n: int) -> None:
    if weights is None:
        return
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"weights must be {n} numbers, one per client (e.g. sample counts)") from None
    if w.shape != (n,):
        raise InputError(f"weights must be {n} numbers, one per client, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError("weights must be finite and >= 0 (e.g. sample counts); got "
                         f"{[float(v) for v in w if not (np.isfinite(v) and v >= 0)][:3]}")
    if not np.any(w > 0):
        raise InputError("weights are all zero: the weighted sum would be empty; give each client its sample count")


def _check_options(function, protection: str, options: Mapping[str, object]) -> None:
    """Unknown keyword arguments are errors that name the closest known one."""
    accepted = {name for name, p in inspect.signature(function).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    known = accepted | set(inspect.signature(aggregate).parameters) - {"protocol_options", "updates", "protocol"}
    for name in options:
        if name in accepted:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(sorted(known))}"
        raise ConfigError(f"aggregate(protection={protection!r}) got an unknown option {name!r}{hint}")
