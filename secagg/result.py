"""The value every aggregation protocol returns, whatever protects the updates."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AggregateResult:
    """Outcome of one aggregation round.

    ``total`` is the decoded float sum over the clients in ``included`` (the only thing the
    server learns). ``max_quantization_error`` bounds |total - exact float sum| per
    coordinate from encoding alone (fixed-point rounding for masking, CKKS noise estimate
    for ckks). ``timings`` maps "<side>.<phase>" to seconds.
    """

    total: np.ndarray
    included: tuple[int, ...]
    bytes_up_per_param: float
    timings: dict[str, float] = field(default_factory=dict)
    protocol: str = "masking"
    max_quantization_error: float = 0.0
    dropped: dict[str, tuple[int, ...]] = field(default_factory=dict)
    parameters: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """Unweighted mean over the included clients."""
        return self.total / max(len(self.included), 1)
