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
distributed discrete noise of :mod:`privacy.distributed`, which is accounted through its
Gaussian-equivalent noise multiplier (see ``docs/accounting.md`` for the assumptions).
"""

from __future__ import annotations

import enum
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
