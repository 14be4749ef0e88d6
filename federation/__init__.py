"""Federated learning on top of secagg and privacy: rounds of local training whose updates are
protected (masking, SecAgg+, CKKS) and whose releases are accounted in the privacy ledger.

Recipe::

    from federation import ExperimentConfig, Federation

    config = ExperimentConfig(dataset="breast_cancer", protection="masking", dp="dpsgd",
                              noise_multiplier=1.5, batch_size=8, budget_epsilon=8.0, rounds=5,
                              out_dir="out/my-run")
    summary = Federation(config).run()

Your own model and per-site data (every ExperimentConfig option is a keyword; see
docs/quickstart.md)::

    fed = Federation(model=make_model, client_data=[(x1, y1), (x2, y2)], test_data=(x, y),
                     loss=torch.nn.CrossEntropyLoss(), protection="masking", dp="dpsgd",
                     budget_epsilon=8.0, rounds=5, out_dir="out/mine")
    summary = fed.run()
    model = fed.global_model()

Everything is checked when ``Federation`` is built, before any client trains. Submodules:
``engine`` (the round loop), ``strategies``, ``data``, ``models``, ``training``, ``aggregators``,
``accounting``, ``checkpoint``, ``scenarios`` (the demos), ``custom`` (the caller's own model,
data and hooks), ``outputs`` (metrics.csv, model.pt); ``transport`` holds the gRPC and Ray
backends. Importing ``federation`` is cheap: torch loads only when an engine piece is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExperimentConfig", "Federation", "RoundResult", "RunSummary", "scenario_config"]

_LAZY = {
    "ExperimentConfig": "federation.config",
    "Federation": "federation.engine",
    "RoundResult": "federation.engine",
    "RunSummary": "federation.engine",
    "scenario_config": "federation.scenarios",
}


def __getattr__(name: str) -> Any:  # PEP 562: keep torch out of `import federation`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'federation' has no attribute {name!r}")
