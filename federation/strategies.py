"""Server strategies: how the global model moves given the aggregate client update.

The strategy sees only the aggregate (the mean update over the clients whose input counted),
never an individual update, so every strategy here works unchanged under masking or CKKS.

- ``fedavg``: x <- x + lr * mean_delta (McMahan et al. 2017; lr = 1 is plain averaging);
- ``fedprox``: FedAvg on the server; clients add the proximal term mu/2 ||w - x||^2
  (Li et al. 2020), exposed as :attr:`Strategy.proximal_mu`;
- ``fedadam`` / ``fedyogi``: adaptive server optimizers of Reddi et al. 2021 ("Adaptive
  Federated Optimization", Algorithm 2) treating -mean_delta as a pseudo-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from secagg.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass
class Strategy:
    """A server optimizer with an explicit, checkpointable state."""

    name: str = "fedavg"
    server_lr: float = 1.0
    proximal_mu: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = None
    v: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        if self.server_lr <= 0:
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.name != "fedprox" and self.proximal_mu:
            raise ConfigError("proximal_mu is a FedProx option; set strategy = 'fedprox' to use it")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.tau <= 0:
            raise ConfigError("adaptive strategies need 0 <= beta1, beta2 < 1 and tau > 0")

    def apply(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """Return the new global parameters; updates the optimizer state in place."""
        if self.name in ("fedavg", "fedprox"):
            return params + self.server_lr * mean_delta
        if self.m is None:
            self.m = np.zeros_like(params)
            # Reddi et al. initialise v with tau^2 so the first steps are not huge.
            self.v = np.full_like(params, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * mean_delta
        sq = mean_delta**2
        if self.name == "fedadam":
            self.v = self.beta2 * self.v + (1 - self.beta2) * sq
        else:  # fedyogi
            self.v = self.v - (1 - self.beta2) * sq * np.sign(self.v - sq)
        return params + self.server_lr * self.m / (np.sqrt(self.v) + self.tau)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer state as named arrays (empty for FedAvg / FedProx)."""
        return {k: getattr(self, k) for k in ("m", "v") if getattr(self, k) is not None}

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        unknown = set(state) - {"m", "v"}
        if unknown:
            raise ConfigError(f"strategy state has unknown entries {sorted(unknown)}")
        self.m = state.get("m")
        self.v = state.get("v")


def default_server_lr(name: str) -> float:
    """1.0 for averaging; Reddi et al.'s typical 10^-2 for the adaptive optimizers."""
    return 1.0 if name in ("fedavg", "fedprox") else 1e-2
