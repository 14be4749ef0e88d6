"""Privacy events: frozen values holding exactly what accounting needs.

Rules (as in ``dp_accounting.dp_event``):

1. An event holds the (hyper)parameters that are necessary and sufficient to account
   one release; nothing else.
2. The meaning of an existing event or field never changes. A new mechanism gets a new
   ``mechanism`` label or a new event class, never a reinterpretation of an old one;
   the ledger stores events by ``to_dict()`` and must recompute the same epsilon later.
3. Events validate themselves on construction; an invalid event cannot exist.

Every mechanism this package releases reduces, for accounting, to a *Poisson-subsampled
Gaussian mechanism* composed ``steps`` times: DP-SGD (record level: a record is in each
batch with probability ``sample_rate``), DP-FedAvg (user level: a client is sampled with
probability ``sample_rate``, its update clipped to ``clipping_norm`` and Gaussian noise of
std ``noise_multiplier * clipping_norm`` added to the sum, McMahan et al. 2018), and the
Skellam noise of :mod:`privacy.distributed` (through the Gaussian whose RDP dominates it).
The distributed discrete Gaussian is its own event, :class:`DistributedDiscreteGaussianEvent`,
accounted by RDP with the bound proven for it (see ``docs/accounting.md``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from privacy._checks import check_noise_multiplier, check_sample_rate, check_steps
from secagg.errors import ConfigError


class Level(str, enum.Enum):
    """Unit of privacy: one training record, or all data of one user (client)."""

    RECORD = "record"
    USER = "user"


class Mechanism(str, enum.Enum):
    """What produced the release. Accounting is the same; the report explains each."""

    DPSGD = "dp-sgd"  # per-example clipping + Gaussian noise on each client (record level)
    DPFEDAVG = "dp-fedavg"  # client sampling + update clipping + Gaussian noise on the aggregate
    DISTRIBUTED_DGAUSS = "distributed-dgauss"  # each client adds discrete Gaussian noise
    DISTRIBUTED_SKELLAM = "distributed-skellam"  # each client adds Skellam noise


@dataclass(frozen=True, slots=True)
class SampledGaussianEvent:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is the noise standard deviation divided by the L2 sensitivity
    (the clipping norm); ``0`` means no noise (infinite epsilon).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    level: Level = Level.RECORD
    mechanism: Mechanism = Mechanism.DPSGD
    clipping_norm: float | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", check_steps(self.steps))
        try:
            object.__setattr__(self, "level", Level(self.level))
        except ValueError:
            raise ConfigError(
                f"level must be one of {[m.value for m in Level]}, got {self.level!r}"
            ) from None
        try:
            object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        except ValueError:
            raise ConfigError(
                f"mechanism must be one of {[m.value for m in Mechanism]}, got {self.mechanism!r}"
            ) from None
        if self.clipping_norm is not None:
            if not isinstance(self.clipping_norm, (int, float)) or not self.clipping_norm > 0:
                raise ConfigError(
                    f"clipping_norm must be a number > 0 or None, got {self.clipping_norm!r}"
                )
            object.__setattr__(self, "clipping_norm", float(self.clipping_norm))

    @property
    def is_private(self) -> bool:
        return self.noise_multiplier > 0 or self.steps == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "sampled-gaussian",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "level": self.level.value,
            "mechanism": self.mechanism.value,
            "clipping_norm": self.clipping_norm,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampledGaussianEvent:
        if not isinstance(data, dict) or data.get("type") != "sampled-gaussian":
            raise ConfigError(f"not a serialised SampledGaussianEvent: {data!r}")
        return cls(
            noise_multiplier=data["noise_multiplier"],
            sample_rate=data["sample_rate"],
            steps=data["steps"],
            level=data.get("level", Level.RECORD.value),
            mechanism=data.get("mechanism", Mechanism.DPSGD.value),
            clipping_norm=data.get("clipping_norm"),
        )


def dpsgd_event(
    *, noise_multiplier: float, sample_rate: float, steps: int, max_grad_norm: float | None = None
) -> SampledGaussianEvent:
    """Record-level event of ``steps`` DP-SGD steps (Abadi et al. 2016)."""
    return SampledGaussianEvent(
        noise_multiplier, sample_rate, steps, Level.RECORD, Mechanism.DPSGD, max_grad_norm
    )


def dpfedavg_event(
    *, noise_multiplier: float, client_sample_rate: float, rounds: int = 1,
    clipping_norm: float | None = None,
) -> SampledGaussianEvent:
    """User-level event of ``rounds`` DP-FedAvg rounds (McMahan et al. 2018).

    ``noise_multiplier`` = std of the Gaussian noise added to the *sum* of clipped
    updates divided by the update clipping norm.
    """
    return SampledGaussianEvent(
        noise_multiplier, client_sample_rate, rounds, Level.USER, Mechanism.DPFEDAVG, clipping_norm
    )


#: RDP orders used to account the distributed discrete Gaussian (Prop. 14 holds for alpha >= 1).
DDG_RDP_ORDERS: tuple[float, ...] = (
    tuple(1.0 + x / 20.0 for x in range(1, 20)) + tuple(2.0 + x / 4.0 for x in range(40))
    + tuple(float(a) for a in range(12, 65)) + (80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0)
)


@dataclass(frozen=True, slots=True)
class DistributedDiscreteGaussianEvent:
    """``steps`` releases of an integer vector plus the sum of ``summands`` independent
    discrete Gaussian shares N_Z(0, s^2), s^2 = ``client_variance`` (Kairouz, Liu & Steinke
    2021). ``summands`` counts the shares nobody but their owner knows: the honest survivors,
    i.e. at least the secure-aggregation threshold minus the assumed colluders, who can
    subtract their own shares. ``l2_sensitivity`` and ``dim`` are in integer (quantized)
    units. No amplification by client sampling is claimed (q = 1).

    Only the RDP accountant has a proof for this mechanism (:meth:`rdp`); PRV and PLD, which
    would treat the sum as a continuous Gaussian, refuse it.
    """

    l2_sensitivity: float
    client_variance: float
    summands: int
    dim: int
    steps: int
    clipping_norm: float | None = None

    def __post_init__(self) -> None:
        from privacy._checks import check_positive, check_positive_int

        object.__setattr__(self, "l2_sensitivity", check_positive(self.l2_sensitivity, name="l2_sensitivity"))
        variance = check_positive(self.client_variance, name="client_variance")
        if variance < 0.25:
            raise ConfigError(
                f"client_variance={variance!r}: the distributed discrete Gaussian bound needs a per-client "
                "parameter s >= 1/2 (variance >= 0.25); use a larger fixed-point scale or more noise")
        object.__setattr__(self, "client_variance", variance)
        object.__setattr__(self, "summands", check_positive_int(self.summands, name="summands"))
        object.__setattr__(self, "dim", check_positive_int(self.dim, name="dim"))
        object.__setattr__(self, "steps", check_steps(self.steps))
        if self.clipping_norm is not None:
            object.__setattr__(self, "clipping_norm", check_positive(self.clipping_norm, name="clipping_norm"))

    level = Level.USER
    mechanism = Mechanism.DISTRIBUTED_DGAUSS
    sample_rate = 1.0

    @property
    def tau(self) -> float:
        """Kairouz et al. 2021, Thm. 1: tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k/(k+1))."""
        s2, n = self.client_variance, self.summands
        return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, n))

    def rdp(self, orders: tuple[float, ...] = DDG_RDP_ORDERS) -> list[float]:
        """Renyi DP of all ``steps`` releases at each order (Kairouz et al. 2021, Prop. 14 /
        Eq. 17, as in the authors' accounting code): per release
        ``min(a S^2/2 + tau d, a/2 (S + sqrt(d) tau)^2)``, S = D2 / sqrt(n s^2)."""
        scale = self.l2_sensitivity / math.sqrt(self.summands * self.client_variance)
        tau, d = self.tau, self.dim
        return [self.steps * min(a * scale * scale / 2.0 + tau * d, a / 2.0 * (scale + math.sqrt(d) * tau) ** 2)
                for a in orders]

    @property
    def noise_multiplier(self) -> float:
        """The largest Gaussian multiplier z whose RDP a/(2z^2) dominates one release's bound at
        every order (display only: the accountant uses :meth:`rdp`)."""
        one = DistributedDiscreteGaussianEvent(self.l2_sensitivity, self.client_variance, self.summands,
                                               self.dim, 1, self.clipping_norm)
        return min(math.sqrt(a / (2.0 * r)) for a, r in zip(DDG_RDP_ORDERS, one.rdp()))

    @property
    def is_private(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "distributed-dgauss",
            "l2_sensitivity": self.l2_sensitivity,
            "client_variance": self.client_variance,
            "summands": self.summands,
            "dim": self.dim,
            "steps": self.steps,
            "clipping_norm": self.clipping_norm,
            "level": self.level.value,
            "mechanism": self.mechanism.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistributedDiscreteGaussianEvent:
        if not isinstance(data, dict) or data.get("type") != "distributed-dgauss":
            raise ConfigError(f"not a serialised DistributedDiscreteGaussianEvent: {data!r}")
        return cls(data["l2_sensitivity"], data["client_variance"], data["summands"], data["dim"],
                   data["steps"], data.get("clipping_norm"))


#: Every event the ledger and the accountants know.
PrivacyEvent = SampledGaussianEvent | DistributedDiscreteGaussianEvent


def event_from_dict(data: dict[str, Any]) -> PrivacyEvent:
    """Read back any event stored by ``to_dict``."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "distributed-dgauss":
        return DistributedDiscreteGaussianEvent.from_dict(data)
    return SampledGaussianEvent.from_dict(data)
