"""Communication graphs: complete (Bonawitz et al. 2017) or sparse k-regular (SecAgg+).

SecAgg+ (Bell et al., CCS 2020) replaces the complete graph by a random k-regular graph:
each client agrees masks with, and secret-shares to, only its k neighbours, so client
and server work drop from O(n) to O(k) per client. The graph is a Harary graph H(k, n)
(client i linked to the k/2 nearest positions on each side of a ring) over a random
permutation of the clients, the permutation derived from a public per-round seed so every
party computes the same graph and no party can choose it after the fact.

Choosing k and the threshold t (inside each neighbourhood), for n clients, dropout rate
``dropout`` and a fraction ``corrupt`` of clients colluding with the server:

* security: the adversary must not hold t of a client's k neighbours' shares,
  ``P[Binomial(k, corrupt) >= t] <= 2^-security_bits / n``;
* correctness: every client keeps at least t live neighbours,
  ``P[Binomial(k, dropout) > k - t] <= 2^-correctness_bits / n``.

:func:`choose_degree` returns the smallest even k (and its t) meeting both bounds, or
the complete graph when none does. These are per-neighbourhood union bounds, a
simplification of Bell et al.'s analysis (which also bounds graph connectivity); use the
complete graph when n is small or the analysis does not fit your threat model.
"""

from __future__ import annotations

import math
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


def choose_degree(
    n: int, *, dropout: float, corrupt: float = 0.05, security_bits: int = 40, correctness_bits: int = 20
) -> tuple[int, int]:
    """Smallest even degree k and neighbourhood threshold t meeting the bounds above.

    Returns ``(n - 1, n // 2 + 1)`` (the complete graph with a majority threshold, the
    setting analysed by Bonawitz et al.) when no sparse degree qualifies.
    """
    if not 0 <= dropout < 1 or not 0 <= corrupt < 1:
        raise ConfigError("dropout and corrupt must be fractions in [0, 1)")
    if dropout + corrupt >= 1:
        raise ConfigError("dropout + corrupt must be below 1: nobody would be left to unmask")
    sec = math.log(n) + security_bits * math.log(2)
    cor = math.log(n) + correctness_bits * math.log(2)
    for k in range(2, n - 1, 2):
        size = k + 1  # neighbourhood includes the client itself
        t = _smallest_secure_threshold(size, corrupt, sec)
        if t is not None and _log_tail_above(size, dropout, size - t) <= -cor:
            return k, t
    return n - 1, n // 2 + 1


def _smallest_secure_threshold(size: int, p: float, log_bound: float) -> int | None:
    for t in range(size // 2 + 1, size + 1):
        if _log_tail_at_least(size, p, t) <= -log_bound:
            return t
    return None


def _log_tail_at_least(n: int, p: float, t: int) -> float:
    """log P[Binomial(n, p) >= t]."""
    if t <= 0:
        return 0.0
    if p == 0:
        return -math.inf
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(t, n + 1)
    ]
    m = max(terms)
    return m + math.log(sum(math.exp(x - m) for x in terms))


def _log_tail_above(n: int, p: float, limit: int) -> float:
    """log P[Binomial(n, p) > limit]."""
    return _log_tail_at_least(n, p, limit + 1) if limit + 1 <= n else -math.inf


def _permutation(ids: list[int], seed: bytes) -> list[int]:
    # Sort by a keyed hash: a uniformly random permutation determined by the public seed.
    return sorted(ids, key=lambda u: derive(seed, label=b"secagg/v1/graph", context=u.to_bytes(8, "big")))


def _check_threshold(threshold: int, size: int) -> None:
    if not 1 <= threshold <= size:
        raise ConfigError(f"threshold must be between 1 and {size}, got {threshold}")
