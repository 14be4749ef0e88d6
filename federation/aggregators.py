"""Update protection backends: how the round's client vectors become one aggregate.

An :class:`Aggregator` takes the (n, d) matrix of vectors the sampled clients *would* upload
(a row per sampled client; rows of clients that drop before uploading are never read) and the
round's dropouts, and returns a :class:`secagg.RoundOutcome` whose ``total`` is the sum over
``included`` -- the only thing the server learns. Backends:

- ``none``: plain float sum (the baseline; the server sees every update),
- ``masking``: pairwise-masking secure aggregation over the complete graph (Bonawitz et al. 2017),
- ``masking-sparse``: SecAgg+ over a sparse random graph (Bell et al. 2020),
- ``ckks``: CKKS homomorphic encryption (TenSEAL); the server never holds the secret key.

Dropout semantics are the protocol's: for masking a client that drops at "advertise", "share"
or "masked_input" is left out of the sum, one that drops later ("consistency", "unmask") has
already uploaded and still counts; the ``none`` backend follows the same rule so that all
backends sum the same clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from secagg.errors import ConfigError
from secagg.protocol.common import PRE_UPLOAD_STAGE_NAMES as PRE_UPLOAD_STAGES
from secagg.protocol.common import STAGE_NAMES as STAGES
from secagg.rounds import RoundOutcome

#: an experiment's protection -> the core Mode that runs it (secagg.rounds.get_mode) and its options
PROTECTION_MODES = {"none": ("none", {}), "masking": ("masking", {"graph": "complete"}),
                    "masking-sparse": ("masking", {"graph": "sparse"}), "ckks": ("ckks", {})}
PROTECTIONS = tuple(PROTECTION_MODES)


class Aggregator(Protocol):
    """Turns the round's client vectors into their sum over the clients that counted."""

    name: str

    def aggregate(
        self, vectors: np.ndarray, *, dropouts: Mapping[str, Sequence[int]], clip: float | None,
        **protocol_options,
    ) -> RoundOutcome: ...


@dataclass(frozen=True)
class PlainAggregator:
    """No protection: the server receives every float32 vector and sums them."""

    name: str = "none"

    def aggregate(
        self, vectors: np.ndarray, *, dropouts: Mapping[str, Sequence[int]], clip: float | None,
        **protocol_options,
    ) -> RoundOutcome:
        if protocol_options:
            raise ConfigError(f"protection 'none' takes no protocol options, got {sorted(protocol_options)}")
        gone = {int(i) for stage in PRE_UPLOAD_STAGES for i in dropouts.get(stage, ())}
        included = tuple(i for i in range(len(vectors)) if i not in gone)
        total = vectors[list(included)].astype(np.float64).sum(axis=0)
        return RoundOutcome(
            total=total, included=included, bytes_up_per_param=4.0, protection="none",
            dropped={s: tuple(int(i) for i in v) for s, v in dropouts.items() if v},
        )


@dataclass(frozen=True)
class SecureAggregator:
    """Masking (complete or sparse graph) or CKKS, through :func:`secagg.aggregate`.

    ``clip`` is the bound on each uploaded vector's L2 norm that the engine has already enforced;
    the masking protocol sizes its fixed-point range from it.
    """

    name: str
    threshold: int | None = None
    bits: int = 32
    seed: int | None = None

    def aggregate(
        self, vectors: np.ndarray, *, dropouts: Mapping[str, Sequence[int]], clip: float | None,
        **protocol_options,
    ) -> RoundOutcome:
        """``protocol_options`` go to the protocol unchanged (for masking: ``scale``,
        ``client_noise`` and ``noise_headroom`` of distributed DP noise)."""
        import secagg

        drops = {s: list(v) for s, v in dropouts.items() if v}
        if self.name == "ckks":
            return secagg.aggregate(vectors, protection="ckks", dropouts=drops, clip=clip, **protocol_options)
        return secagg.aggregate(
            vectors, protection="masking", **PROTECTION_MODES[self.name][1],
            threshold=self.threshold, dropouts=drops, clip=clip, clip_mode="l2", bits=self.bits,
            seed=self.seed, **protocol_options,
        )


def make_aggregator(
    protection: str, *, threshold: int | None = None, bits: int = 32, seed: int | None = None
) -> Aggregator:
    if protection == "none":
        return PlainAggregator()
    if protection in ("masking", "masking-sparse", "ckks"):
        return SecureAggregator(protection, threshold=threshold, bits=bits, seed=seed)
    raise ConfigError(f"unknown protection {protection!r}; choose one of {', '.join(PROTECTIONS)}")


def protocol_available(protection: str) -> str | None:
    """None if ``protection`` can run here, else a sentence saying what is missing."""
    import importlib

    entry = {"masking": ("secagg.protocol.simulate", "aggregate_masking"),
             "masking-sparse": ("secagg.protocol.simulate", "aggregate_masking"),
             "ckks": ("secagg.ckks", "aggregate_ckks")}.get(protection)
    if entry is None:
        return None
    module, function = entry
    try:
        getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        return f"protection {protection!r} needs {module}.{function}, which is not available here ({exc})"
    return None
