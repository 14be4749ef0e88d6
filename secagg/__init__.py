"""secagg: secure aggregation for federated learning.

Recipes (safe defaults): :func:`secagg.aggregate`, the ``secagg.protocol`` sessions.
Hazardous materials (building blocks): ``secagg.prg``, ``secagg.keys``, ``secagg.shamir``,
``secagg.encoding`` -- use them only if you know why the recipes do not fit.
"""

from secagg.api import aggregate
from secagg.rounds import RoundOutcome

__all__ = ["aggregate", "RoundOutcome"]
__version__ = "0.1.0"
