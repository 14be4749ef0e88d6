"""The one rule that sets a masking round's threshold and graph degree, and the client's policy.

Threat model (Bonawitz et al., CCS 2017, §6; Bell et al., CCS 2020, malicious setting): the
server is actively malicious and up to ``c`` of the *other* participants collude with it.
A client owns its :class:`ClientPolicy`; the server only proposes a round, and every honest
client re-derives the minimum threshold from its own policy and refuses a round below it.

Why the threshold must be this large. Take a victim v whose shares are held by its
neighbourhood of size ``k + 1`` (v, plus k neighbours; ``k = n - 1`` on the complete graph)
and let ``c_v`` of v's neighbours collude. The server learns v's input in two ways:

* split: tell honest group A "v survived" (A reveals v's self-mask shares) and group B "v
  dropped" (B reveals v's mask-key shares). Each group must see t signatures on its own
  survivor set: colluders sign both, v signs A's. So ``|A| + 1 + c_v >= t`` and
  ``|B| + c_v >= t`` with ``|A| + |B| = k - c_v``: possible iff ``c_v >= 2t - k - 1``.
* isolation: hide v's honest neighbours from v (deliver none of their shares), so v masks
  only with colluders, then unmask v's self-mask legitimately: possible iff ``c_v >= t - 1``.

So a round is safe iff ``c_v < min(t - 1, 2t - k - 1)`` (:func:`attack_size`). On the
complete graph ``c_v = c`` and this is ``t > (n + c) / 2`` (Bonawitz et al.). On a SecAgg+
graph a client's k neighbours are a uniformly random k-subset of the other n - 1 clients,
so ``c_v`` is hypergeometric; the round is safe when
``P[c_v >= attack_size] <= 2^-security_bits / (n * 2^grinding_bits)``: a union bound over
the n possible victims and the 2^grinding_bits graph seeds a server can try (the seed is a
hash of every signed advert, so each try costs it a round trip of hashing; see
:func:`secagg.protocol.common.graph_seed`).

With a fraction ``collusion`` of the other participants colluding, ``c = floor(collusion *
(n - 1))``. Defaults: at most 1/3 collude, 2^-40, 2^40 seed tries, at least 3 participants.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError
from secagg.protocol.messages import MAX_DIM, ROUND_ID_BYTES, RoundConfig
from secagg.protocol.replay import RoundIdStore, default_round_ids

GRAPHS = ("complete", "sparse")
CORRECTNESS_BITS = 20  # a sparse round fails for lack of live neighbours with probability <= 2^-20


@dataclass(frozen=True)
class ClientPolicy:
    """What a client insists on before it takes part, whatever the server proposes.

    ``min_participants``: the smallest sum this client accepts to be part of (rounds with
    fewer participants, or fewer survivors, are refused). ``collusion``: the fraction of the
    *other* participants assumed to collude with the server. ``security_bits``: the server
    unmasks an honest client with probability at most 2^-security_bits. ``grinding_bits``:
    log2 of the graph seeds a server is assumed able to try. ``max_dim`` bounds the work a
    server can demand. ``round_ids`` remembers the round ids this client signed in, so it
    never signs in the same round twice (a process-wide in-memory store unless given one,
    e.g. :class:`~secagg.protocol.replay.FileRoundIds` to survive restarts).
    """

    min_participants: int = 3
    collusion: float = 1 / 3
    security_bits: int = 40
    grinding_bits: int = 40
    max_dim: int = MAX_DIM
    round_ids: RoundIdStore = field(default_factory=default_round_ids)

    def __post_init__(self) -> None:
        if self.min_participants < 2:
            raise ConfigError("min_participants must be at least 2 (one client's sum is its update)")
        if not 0 <= self.collusion < 1:
            raise ConfigError("collusion must be a fraction in [0, 1)")
        if self.security_bits < 1 or self.grinding_bits < 0:
            raise ConfigError("security_bits must be >= 1 and grinding_bits >= 0")

    def colluders(self, n: int) -> int:
        """How many of the other n - 1 participants are assumed to collude with the server."""
        return math.floor(self.collusion * (n - 1) + 1e-9)


@dataclass(frozen=True)
class MaskingPlan:
    """A round's security parameters and what they leave for dropouts."""

    n: int
    degree: int  # n - 1: complete graph
    threshold: int
    colluders: int  # assumed, among the other n - 1 participants

    @property
    def complete(self) -> bool:
        return self.degree >= self.n - 1

    @property
    def tolerated_dropouts(self) -> int:
        """Clients (complete graph) or neighbours (SecAgg+) that may vanish before unmasking."""
        return self.degree + 1 - self.threshold


def attack_size(threshold: int, degree: int) -> int:
    """Colluding neighbours the server needs to unmask one client (see module docstring)."""
    return min(threshold - 1, 2 * threshold - degree - 1)


def min_threshold(n: int, degree: int, policy: ClientPolicy) -> int | None:
    """The smallest threshold that keeps every client safe under ``policy``; None if none does.

    This is the only threshold rule of the code base: servers plan with it, clients check
    with it.
    """
    return _min_threshold(n, min(degree, n - 1), policy.colluders(n), policy.security_bits + policy.grinding_bits)


def check_round(n: int, degree: int, threshold: int, policy: ClientPolicy) -> str | None:
    """Why ``policy`` refuses a round of n participants, this degree and threshold (None: accept)."""
    if n < policy.min_participants:
        return f"the round has {n} participants; this client requires at least {policy.min_participants}"
    needed = min_threshold(n, degree, policy)
    if needed is None:
        return (f"degree {degree} is too small for {n} participants with up to {policy.colluders(n)} colluders: "
                "no threshold keeps a client's input secret")
    if threshold < needed:
        return (f"threshold {threshold} is too low: with {n} participants, degree {min(degree, n - 1)} and up to "
                f"{policy.colluders(n)} colluders this client requires at least {needed}")
    return None


def plan_masking(
    n: int,
    *,
    graph: str = "complete",
    threshold: int | None = None,
    degree: int | None = None,
    dropout: float = 0.1,
    policy: ClientPolicy | None = None,
) -> MaskingPlan:
    """User options -> degree and threshold. ``threshold`` is a floor: it is raised to the secure minimum.

    ``graph="sparse"`` without ``degree`` picks the smallest even degree whose secure
    threshold still leaves every client enough live neighbours when a fraction ``dropout``
    drops (probability of failure <= 2^-20 per client); if none exists it falls back to the
    complete graph.
    """
    policy = policy or ClientPolicy()
    if graph not in GRAPHS:
        raise ConfigError(f"graph must be 'complete' or 'sparse', got {graph!r}")
    if n < policy.min_participants:
        raise ConfigError(f"a masking round needs at least {policy.min_participants} participants, got {n}")
    if not 0 <= dropout < 1:
        raise ConfigError("dropout must be a fraction in [0, 1)")
    if graph == "complete" or (degree is not None and degree >= n - 1):
        k = n - 1
    elif degree is not None:
        k = degree
        if k < 2 or k % 2:
            raise ConfigError(f"sparse graph degree must be an even number >= 2, got {k}")
    else:
        k = _choose_degree(n, dropout, policy.colluders(n), policy.security_bits + policy.grinding_bits)
    t = min_threshold(n, k, policy)
    if t is None:
        raise ConfigError(
            f"degree {k} is too small for {n} clients with up to {policy.colluders(n)} colluders; "
            f"leave degree unset to get the smallest secure one"
        )
    if threshold is not None:
        if threshold > k + 1:
            raise ConfigError(f"threshold {threshold} exceeds the neighbourhood size {k + 1}")
        t = max(t, threshold)
    return MaskingPlan(n=n, degree=k, threshold=t, colluders=policy.colluders(n))


def plan_round(
    clients: tuple[int, ...],
    dim: int,
    codec: FixedPointCodec,
    *,
    graph: str = "complete",
    threshold: int | None = None,
    dropout: float = 0.1,
    degree: int | None = None,
    policy: ClientPolicy | None = None,
    round_id: bytes | None = None,
) -> RoundConfig:
    """The public parameters of one round, planned by :func:`plan_masking`."""
    plan = plan_masking(len(clients), graph=graph, threshold=threshold, degree=degree, dropout=dropout, policy=policy)
    return RoundConfig(
        round_id=round_id or os.urandom(ROUND_ID_BYTES),
        clients=tuple(clients), threshold=plan.threshold, degree=plan.degree, dim=dim,
        bits=codec.bits, clip=codec.clip, scale=codec.scale, clip_mode=codec.clip_mode, headroom=codec.headroom,
    )


@lru_cache(maxsize=4096)
def _min_threshold(n: int, degree: int, colluders: int, bits: int) -> int | None:
    tail = _log2_colluder_tail(n - 1, colluders, degree)
    budget = -(bits + math.log2(n))
    for t in range(1, degree + 2):
        m = attack_size(t, degree)
        if m >= len(tail) or (m >= 0 and tail[m] <= budget):
            return t
    return None


@lru_cache(maxsize=256)
def _choose_degree(n: int, dropout: float, colluders: int, bits: int) -> int:
    correctness = -(CORRECTNESS_BITS + math.log2(n))
    for k in range(2, n - 1, 2):
        t = _min_threshold(n, k, colluders, bits)
        if t is not None and _log2_binomial_tail_above(k + 1, dropout, k + 1 - t) <= correctness:
            return k
    return n - 1


def _log2_colluder_tail(others: int, colluders: int, degree: int) -> tuple[float, ...]:
    """log2 P[c_v >= m] for m = 0..min(degree, colluders): c_v ~ Hypergeometric(others, colluders, degree)."""
    top = min(degree, colluders)
    low = max(0, degree - (others - colluders))
    total = _log_choose(others, degree)
    logs = [
        (_log_choose(colluders, c) + _log_choose(others - colluders, degree - c) - total) if c >= low else -math.inf
        for c in range(top + 1)
    ]
    tail = [-math.inf] * (top + 1)
    acc = -math.inf
    for m in range(top, -1, -1):
        acc = _logaddexp(acc, logs[m])
        tail[m] = acc / math.log(2)
    return tuple(tail)


def _log2_binomial_tail_above(size: int, p: float, limit: int) -> float:
    """log2 P[Binomial(size, p) > limit]."""
    if limit >= size:
        return -math.inf
    if p == 0:
        return -math.inf if limit >= 0 else 0.0
    acc = -math.inf
    for i in range(max(limit + 1, 0), size + 1):
        acc = _logaddexp(acc, _log_choose(size, i) + i * math.log(p) + (size - i) * math.log1p(-p))
    return acc / math.log(2)


def _log_choose(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _logaddexp(x: float, y: float) -> float:
    if x == -math.inf:
        return y
    if y == -math.inf:
        return x
    hi, lo = max(x, y), min(x, y)
    return hi + math.log1p(math.exp(lo - hi))
