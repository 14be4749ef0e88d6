"""Which per-example clipping DP-SGD uses: Opacus hooks, or Opacus ghost clipping.

Both clip every example's gradient to ``max_grad_norm`` (factor ``min(1, C / (norm + 1e-6))``),
sum the clipped gradients and add the same Gaussian noise, so the noisy step and its privacy
accounting are the same; they differ in how the clipped sum is computed:

* ``"hooks"``: Opacus keeps every example's gradient of every layer (``p.grad_sample``); the
  optimizer takes the norms, clips and sums. Works with any training loop.
* ``"ghost"``: Opacus' fast gradient clipping (Lee & Kifer 2021) with ghost clipping (Li et al.
  2022): the first backward pass only yields each example's gradient norm (Linear and Embedding
  layers never materialise per-example gradients at all), then the loss reweighted by each
  example's clipping factor is backpropagated once more, which gives the clipped sum directly.
  The loss must therefore be per-example: the training loop computes it with the wrapped
  criterion that :func:`privacy.make_private` returns.

:func:`choose_clipping` picks ghost wherever it applies and says why when it does not.
:func:`refuse_unclipped_steps` makes a ghost optimizer refuse a step whose gradient did not
come from the wrapped criterion: a plain ``loss.backward()`` would leave the *unclipped* mean
gradient in ``p.grad``, and Opacus' ghost optimizer would noise and apply it, with no guarantee.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from secagg.errors import ConfigError, PrivacyError

log = logging.getLogger("secagg.dpsgd")

ClippingMode = Literal["auto", "hooks", "ghost"]
MODES = ("auto", "hooks", "ghost")


@dataclass(frozen=True)
class ClippingChoice:
    """The per-example clipping a :class:`~privacy.dpsgd.PrivateTraining` uses, and why."""

    mode: Literal["hooks", "ghost"]
    reason: str


def _ghost_obstacles(model: nn.Module, criterion: Any) -> list[str]:
    """Why ghost clipping cannot run ``model`` with ``criterion`` (empty: it can)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost
    from opacus.utils.module_utils import trainable_modules

    problems = []
    if criterion is None:
        problems.append("no criterion was given, so the training loop computes its own loss and "
                        "cannot use the per-example loss ghost clipping backpropagates (pass "
                        "criterion=nn.CrossEntropyLoss() or another torch loss to allow it)")
    elif not isinstance(criterion, nn.modules.loss._Loss):
        problems.append(f"the criterion ({type(criterion).__name__}) is not a torch loss module "
                        "with a `reduction` that can be set to 'none' for per-example losses")
    elif criterion.reduction != "mean":
        problems.append(f"the criterion's reduction is {criterion.reduction!r}; DP-SGD here "
                        "averages over the batch, so it must be 'mean'")
    modules = list(trainable_modules(model))
    unsupported = [f"{name or '<model>'} ({type(m).__name__})" for name, m in modules
                   if type(m) not in Ghost.NORM_SAMPLERS and type(m) not in Ghost.GRAD_SAMPLERS]
    if unsupported:
        problems.append("Opacus has no norm or per-example gradient sampler for "
                        + ", ".join(unsupported))
    owners = Counter(id(p) for _, m in modules for p in m.parameters(recurse=False))
    if any(count > 1 for count in owners.values()):
        problems.append("parameters are shared between layers (tied weights), which ghost "
                        "clipping does not support")
    return problems


def _ghost_summary(model: nn.Module) -> str:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost
    from opacus.utils.module_utils import trainable_modules

    ghost, per_example = Counter(), Counter()
    for _, m in trainable_modules(model):
        (ghost if type(m) in Ghost.NORM_SAMPLERS else per_example)[type(m).__name__] += 1
    parts = [f"{n} x {t}" for t, n in sorted(ghost.items())]
    norms = ", ".join(parts) or "none"
    others = ", ".join(f"{n} x {t}" for t, n in sorted(per_example.items())) or "none"
    return (f"every trainable layer is supported and the loss is per-example; ghost norms for "
            f"{norms}; per-example gradient norms (fast gradient clipping) for {others}")


def choose_clipping(model: nn.Module, criterion: Any, requested: str = "auto") -> ClippingChoice:
    """Ghost clipping when ``model`` and ``criterion`` allow it, else hooks; logged with why.

    ``requested="ghost"`` refuses (ConfigError, naming every obstacle) where ghost clipping
    cannot run; ``"hooks"`` always uses hooks; ``"auto"`` takes the faster one that applies.
    """
    if requested not in MODES:
        raise ConfigError(f"grad_sample_mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "hooks":
        choice = ClippingChoice("hooks", "grad_sample_mode='hooks' was asked for")
    else:
        obstacles = _ghost_obstacles(model, criterion)
        if obstacles and requested == "ghost":
            raise ConfigError("grad_sample_mode='ghost' cannot be used: " + "; ".join(obstacles)
                              + ". Use grad_sample_mode='auto' to fall back to hooks.")
        choice = (ClippingChoice("hooks", "ghost clipping does not apply: " + "; ".join(obstacles))
                  if obstacles else ClippingChoice("ghost", _ghost_summary(model)))
    log.info("DP-SGD per-example clipping: %s (%s)", choice.mode, choice.reason)
    return choice


def refuse_unclipped_steps(module: Any, optimizer: Any) -> None:
    """Make the ghost ``optimizer`` refuse a step unless the wrapped criterion clipped it.

    The two-pass backward of Opacus' ghost criterion reads the clipping factors
    (``module.get_clipping_coef``) after clearing the gradients; a step is allowed only when
    that happened since the last ``zero_grad`` and the last step.
    """
    state = {"clipped": False}
    coef, zero_grad, pre_step = module.get_clipping_coef, optimizer.zero_grad, optimizer.pre_step

    def clipping_coef() -> Any:
        factors = coef()
        state["clipped"] = True
        return factors

    def cleared(set_to_none: bool = False) -> None:
        state["clipped"] = False
        zero_grad(set_to_none)

    def checked_pre_step(closure: Any = None) -> Any:
        if not state["clipped"]:
            raise PrivacyError(
                "this DP-SGD step's gradient was not clipped per example: with ghost clipping "
                "the loss must come from PrivateTraining.criterion (loss = private.criterion("
                "output, target); loss.backward()), not from a plain loss function"
            )
        state["clipped"] = False
        return pre_step(closure)

    module.get_clipping_coef = clipping_coef
    optimizer.zero_grad = cleared
    optimizer.pre_step = checked_pre_step
