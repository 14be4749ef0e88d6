"""Privacy accounting for a federation: what each round costs, before it runs.

Two kinds of ``dp``:

- ``dpsgd`` (record level): every client runs DP-SGD on its own records. A client with n_k
  samples takes steps_k = epochs * ceil(n_k / B) steps per round at sampling rate q_k = B / n_k.
  The federation's epsilon after r rounds is bounded by the worst client's, assuming it took
  part in every round: eps(max_k q_k, sigma, r * max_k steps_k). Client sampling would only
  lower it, so this is an upper bound that needs no knowledge of who was sampled.
- ``user`` / ``user-distributed`` (user level, DP-FedAvg, McMahan et al. 2018): each client's
  whole update is clipped to C and Gaussian noise of std z*C is added to the sum (by the server,
  or in discrete shares by the clients inside masking). One round is a Gaussian mechanism,
  amplified by client sampling only when clients really are Poisson-sampled (rate q); with a
  fixed number of clients per round no amplification is claimed (q = 1).

Both are Poisson-sampled Gaussian mechanisms, accounted by :func:`privacy.epsilon_of_events`
(PRV by default, Gopi et al. 2021; PLD or RDP on request). Epsilon after r rounds depends only on the configuration, so the ledger
can reserve a round's spend before the round runs (write-ahead) and any reader can recompute it from the events stored in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, lru_cache

import numpy as np

import privacy
from privacy._checks import check_delta
from privacy.events import SampledGaussianEvent, dpsgd_event
from secagg.errors import ConfigError

DP_MODES = ("none", "dpsgd", "user", "user-distributed")


class RoundAccountant:
    """Maps a round count to the federation's cumulative epsilon for one configuration."""

    def __init__(
        self,
        *,
        dp: str,
        delta: float,
        noise_multiplier: float,
        client_sizes: Sequence[int] = (),
        batch_size: int = 32,
        epochs: int = 1,
        client_sample_rate: float = 1.0,
        clip: float | None = None,
        accountant: str = "prv",
        distributed_event: SampledGaussianEvent | None = None,
        dim: int | None = None,
    ) -> None:
        if dp not in DP_MODES:
            raise ConfigError(f"unknown dp {dp!r}; choose one of {', '.join(DP_MODES)}")
        if dp != "none" and not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        self.dp = dp
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self._distributed_event = distributed_event
        if dp == "user-distributed" and distributed_event is None:
            raise ConfigError("user-distributed accounting needs the event of the planned noise shares")
        if dp != "none":
            # delta must stay below 1/n for the unit protected: records of the largest client
            # (record level) or users (user level); otherwise it allows releasing one outright.
            units = (max(client_sizes) if dp == "dpsgd" else len(client_sizes)) if client_sizes else None
            check_delta(delta, dataset_size=units)
        self.accountant = privacy.accountant.check_accountant(accountant)
        # Clients with the same (q, steps) have the same epsilon: keep one of each.
        self._client_profiles = sorted(
            {(min(1.0, batch_size / n), epochs * -(-n // batch_size)) for n in client_sizes}
        )
        self._q_user = client_sample_rate
        self._dim = dim

    def round_event(self) -> SampledGaussianEvent:
        """The privacy event of one round, as the ledger records it.

        Record level: one DP-SGD event with the largest per-client sampling rate and the most
        per-client steps, which bounds every client's round. Clients hold disjoint data, so the
        federation's guarantee is the worst client's (parallel composition); composing this
        event round after round bounds that client's DP-SGD accounting, whatever the horizon.
        """
        if self.dp == "none":
            raise ConfigError("dp = 'none' releases are not accounted; there is no round event")
        if self.dp == "dpsgd":
            return self._worst_profile_event
        if self.dp == "user-distributed":
            return self._distributed_event
        from privacy.dpfedavg import round_event

        if self.clip is None:
            raise ConfigError("user-level DP needs a clipping norm (update_clip > 0)")
        # the central noise lives on a grid; the multiplier it really gives (see privacy.dpfedavg)
        return round_event(noise_multiplier=self.noise_multiplier, client_sample_rate=self._q_user,
                           clip_norm=self.clip, dim=self._dim)

    @cached_property
    def _worst_profile_event(self) -> SampledGaussianEvent:
        # Epsilon grows with both the sampling rate and the number of steps, so the event with the
        # largest rate and the most steps of any client bounds every client, for any horizon.
        q = max(q for q, _ in self._client_profiles)
        steps = max(s for _, s in self._client_profiles)
        return dpsgd_event(noise_multiplier=self.noise_multiplier, sample_rate=q, steps=steps,
                           max_grad_norm=self.clip)

    def epsilon_after(self, rounds: int) -> float:
        """Cumulative epsilon after ``rounds`` rounds; 0 without DP (nothing is claimed then)."""
        if self.dp == "none" or rounds <= 0:
            return 0.0
        return self._epsilon(rounds)

    @lru_cache(maxsize=256)  # noqa: B019 -- the accountant is immutable and lives for one run
    def _epsilon(self, rounds: int) -> float:
        return privacy.epsilon_of_events([self.round_event()] * rounds, delta=self.delta,
                                         accountant=self.accountant)

    @property
    def claims_sampling(self) -> bool:
        """True when the round event claims amplification by user-level client sampling."""
        return self.dp in ("user", "user-distributed") and self.round_event().sample_rate < 1.0

    @property
    def is_private(self) -> bool:
        return self.dp != "none"

    def rounds_within(self, budget: float, max_rounds: int) -> int:
        """How many rounds (up to ``max_rounds``) fit within ``budget``."""
        lo, hi = 0, max_rounds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.epsilon_after(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


class DistributedNoisePlan:
    """Distributed discrete Gaussian noise for ``dp = "user-distributed"`` (masking only).

    Every client adds an integer noise share to its quantized, clipped update before masking
    (Kairouz, Liu & Steinke 2021), sized by :mod:`privacy.distributed` so that the shares of any
    ``threshold`` survivors, less those of the assumed ``colluders`` (a third of the other
    participants by default, who know and can subtract their own shares), carry at least the
    target noise: the round cannot be unmasked with fewer, so the guarantee holds whenever an
    aggregate is released. The event is RDP-accounted (the proven bound for this mechanism). The fixed-point scale is
    fixed here, before the round, because the integer sensitivity (and so the noise and the
    ledger's event) depends on it; ``headroom`` reserves ten share standard deviations per
    coordinate so the noisy sum cannot wrap around.
    """

    def __init__(self, *, clip: float, clients: int, threshold: int, bits: int, noise_multiplier: float,
                 dim: int, sample_rate: float = 1.0, rng_seed: int | None = None,
                 colluders: int | None = None) -> None:
        from privacy import distributed as dist
        from secagg.encoding import FixedPointCodec
        from secagg.protocol.plan import ClientPolicy

        if not 2 <= threshold <= clients:
            raise ConfigError(f"threshold={threshold} must be between 2 and the {clients} clients of a round")
        # Colluding clients subtract their own shares: as the masking policy, assume a third of
        # the other participants collude; only the other survivors' shares are noise to them.
        self.colluders = ClientPolicy().colluders(clients) if colluders is None else colluders
        if not 0 <= self.colluders <= threshold - 1:
            raise ConfigError(
                f"{self.colluders} assumed colluders leave no honest noise share among the {threshold} "
                "survivors a round needs; raise the threshold")
        self.clip, self.dim, self.clients, self.threshold = clip, dim, clients, threshold
        headroom = 0.0
        for _ in range(50):
            codec = FixedPointCodec.for_clients(clip=clip, max_clients=clients, bits=bits, clip_mode="l2",
                                                headroom=headroom)
            sensitivity = dist.quantized_l2_sensitivity(clip_norm=clip, scale=codec.scale, dim=dim)
            share = dist.per_client_noise(
                target_std=dist.target_std_for(noise_multiplier=noise_multiplier, l2_sensitivity=sensitivity),
                n_clients=clients, max_dropouts=clients - threshold + self.colluders)
            needed = 10.0 * share.std / codec.scale
            if needed <= headroom:
                break
            headroom = needed * 1.25
        else:
            raise ConfigError(f"no {bits}-bit encoding leaves room for the distributed noise; use more bits")
        self.scale = codec.scale
        self.headroom = headroom
        self.share = share
        self.event = dist.distributed_event(client_noise=share, l2_sensitivity=sensitivity, dim=dim,
                                            sample_rate=sample_rate, clipping_norm=clip)
        self._rng = None if rng_seed is None else np.random.default_rng(rng_seed)

    def sample(self, row: int, dim: int, scale: float) -> np.ndarray:
        """One client's integer noise share (the protocol's ``client_noise`` callback)."""
        from privacy.distributed import sample_integer_noise

        if dim != self.dim or scale != self.scale:
            raise ConfigError(f"the round encodes at scale {scale} / dim {dim}, but the noise was planned "
                              f"for scale {self.scale} / dim {self.dim}")
        return sample_integer_noise(dim, self.share, rng=self._rng)
