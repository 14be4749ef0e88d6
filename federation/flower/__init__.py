"""Flower (flwr 1.42) interop: this project's secure aggregation inside a Flower app.

Two names replace Flower's own SecAgg+ components; everything else in a Flower app (the
``ClientApp`` with its ``client_fn``, the ``ServerApp``, ``LegacyContext``, the strategy,
``run_simulation`` or ``flwr run``) stays as it is::

    from federation.flower import secaggplus_mod          # was: from flwr.client.mod import secaggplus_mod
    from federation.flower import SecAggPlusWorkflow      # was: from flwr.server.workflow import SecAggPlusWorkflow

Flower is one more link of the round seam: the mod runs the client sessions, the workflow
drives the server's through :func:`secagg.rounds.drive` over a
:class:`~federation.flower.link.FlowerLink`; Flower messages only carry their sealed bytes.
See docs/flower.md.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "federation.flower needs Flower 1.42: pip install 'secagg[flower]' (flwr[simulation]==1.42.*)"
    ) from exc

from federation.flower.mod import secagg_mod
from federation.flower.records import FlowerPrivacy, dp_metrics
from federation.flower.workflow import RoundReport, SecAggWorkflow

# Drop-in names: the same as Flower's, so switching is a change of two imports.
secaggplus_mod = secagg_mod
SecAggPlusWorkflow = SecAggWorkflow

__all__ = [
    "FlowerPrivacy", "RoundReport", "SecAggPlusWorkflow", "SecAggWorkflow", "dp_metrics",
    "secagg_mod", "secaggplus_mod",
]
