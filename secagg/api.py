"""`secagg.aggregate`: one entry point for every protection mode.

It runs the real protocol in process (real keys, real shares, real masks or real CKKS
ciphertexts), so what it returns is what a deployed server would learn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from secagg.errors import ConfigError
from secagg.result import AggregateResult

PROTOCOLS = ("masking", "ckks")


def aggregate(
    updates: np.ndarray,
    *,
    protocol: str = "masking",
    graph: str = "complete",
    threshold: int | None = None,
    dropouts: Mapping[str, Sequence[int]] | None = None,
    clip: float | None = None,
    clip_mode: str = "l2",
    bits: int = 32,
    scale: float | None = None,
    seed: int | None = None,
    weights: Sequence[float] | None = None,
    **protocol_options,
) -> AggregateResult:
    """Securely sum the rows of ``updates`` (an (n, d) float array) over the surviving clients.

    ``dropouts`` maps a stage name to the client indices that drop at that stage. For
    masking the stages are "advertise", "share", "masked_input", "consistency", "unmask";
    for ckks a client that drops before uploading is simply left out of the sum.
    ``seed`` makes the decoded result reproducible by fixing the (non-secret) stochastic
    rounding; keys, masks and shares always come from the OS CSPRNG.
    """
    if protocol == "masking":
        from secagg.protocol.simulate import aggregate_masking

        return aggregate_masking(
            updates, graph=graph, threshold=threshold, dropouts=dropouts, clip=clip,
            clip_mode=clip_mode, bits=bits, scale=scale, seed=seed, weights=weights,
            **protocol_options,
        )
    if protocol == "ckks":
        from secagg.ckks import aggregate_ckks

        return aggregate_ckks(updates, dropouts=dropouts, clip=clip, weights=weights, **protocol_options)
    raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
