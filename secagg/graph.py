"""Communication graphs: complete (Bonawitz et al. 2017) or sparse k-regular (SecAgg+).

SecAgg+ (Bell et al., CCS 2020) replaces the complete graph by a random k-regular graph:
each client agrees masks with, and secret-shares to, only its k neighbours, so client
and server work drop from O(n) to O(k) per client. The graph is a Harary graph H(k, n)
(client i linked to the k/2 nearest positions on each side of a ring) over a random
permutation of the clients, the permutation derived from a public per-round seed so every
party computes the same graph and no party can choose it after the fact.

The degree k and the threshold t are chosen by :mod:`secagg.protocol.plan`, the one
threshold rule, which every client also enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from secagg.errors import ConfigError
from secagg.keys import derive


@dataclass(frozen=True)
class Graph:
    """Who shares and masks with whom; ``neighbours(u)`` includes u itself."""

    clients: tuple[int, ...]
    degree: int  # number of neighbours excluding self; len(clients) - 1 means complete
    threshold: int
    seed: bytes = b""

    @property
    def complete(self) -> bool:
        return self.degree >= len(self.clients) - 1

    @cached_property
    def _adjacency(self) -> dict[int, frozenset[int]]:
        ids = list(self.clients)
        n = len(ids)
        if self.complete:
            everyone = frozenset(ids)
            return {u: everyone for u in ids}
        order = _permutation(ids, self.seed)
        half = self.degree // 2
        position = {u: i for i, u in enumerate(order)}
        adjacency = {}
        for u in ids:
            p = position[u]
            adjacency[u] = frozenset(order[(p + off) % n] for off in range(-half, half + 1))
        return adjacency

    def neighbours(self, client: int) -> frozenset[int]:
        return self._adjacency[client]


def complete_graph(clients: tuple[int, ...], threshold: int) -> Graph:
    _check_threshold(threshold, len(clients))
    return Graph(tuple(clients), len(clients) - 1, threshold)


def sparse_graph(clients: tuple[int, ...], *, degree: int, threshold: int, seed: bytes) -> Graph:
    n = len(clients)
    if degree % 2 or degree < 2:
        raise ConfigError(f"sparse graph degree must be an even number >= 2, got {degree}")
    if degree >= n - 1:
        return complete_graph(clients, threshold)
    _check_threshold(threshold, degree + 1)
    return Graph(tuple(clients), degree, threshold, seed)


def _permutation(ids: list[int], seed: bytes) -> list[int]:
    # Sort by a keyed hash: a uniformly random permutation determined by the public seed.
    return sorted(ids, key=lambda u: derive(seed, label=b"secagg/v1/graph", context=u.to_bytes(8, "big")))


def _check_threshold(threshold: int, size: int) -> None:
    if not 1 <= threshold <= size:
        raise ConfigError(f"threshold must be between 1 and {size}, got {threshold}")
