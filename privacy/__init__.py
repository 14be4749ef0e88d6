"""Differential privacy for secagg: DP-SGD clients, accountants, planner, ledger, reports.

Recipes:

* :func:`privacy.epsilon` / :func:`privacy.noise_multiplier` -- account or plan a
  Poisson-sampled Gaussian mechanism (DP-SGD steps or DP-FedAvg rounds) with the
  ``"prv"``, ``"pld"`` or ``"rdp"`` accountant.
* :func:`privacy.make_private` -- wrap a model, optimizer and data loader with Opacus.
* :class:`privacy.ledger.Ledger` -- append-only, hash-chained, budget-enforcing ledger.
* :mod:`privacy.dpfedavg` -- user-level DP-FedAvg pieces (update clipping, noise on the sum).
* :mod:`privacy.distributed` -- per-client discrete noise for masked aggregation.
* :mod:`privacy.report` -- HTML / JSON budget reports.

Importing ``privacy`` is cheap: torch and opacus load only when a function needs them.
This package never imports ``federation``.
"""

from __future__ import annotations

from typing import Any

from privacy.accountant import ACCOUNTANTS, Accountant, epsilon, epsilon_of_events
from privacy.events import Level, Mechanism, SampledGaussianEvent, dpfedavg_event, dpsgd_event
from privacy.planner import max_steps, noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "Level",
    "Mechanism",
    "PrivateTraining",
    "SampledGaussianEvent",
    "TrainStats",
    "dpfedavg_event",
    "dpsgd_event",
    "epsilon",
    "epsilon_of_events",
    "make_private",
    "max_steps",
    "noise_multiplier",
    "train_private",
]

_LAZY = {"make_private", "PrivateTraining", "TrainStats", "train_private", "validate_model"}


def __getattr__(name: str) -> Any:  # PEP 562: keep torch out of `import privacy`
    if name in _LAZY:
        from privacy import dpsgd

        return getattr(dpsgd, name)
    raise AttributeError(f"module 'privacy' has no attribute {name!r}")
