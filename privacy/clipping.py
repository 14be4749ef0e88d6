"""Which per-example clipping DP-SGD uses: Opacus hooks, Opacus ghost clipping, or ghost
clipping in one backward pass.

All clip every example's gradient to ``max_grad_norm`` (factor ``min(1, C / (norm + 1e-6))``),
sum the clipped gradients and add the same Gaussian noise, so the noisy step and its privacy
accounting are the same; they differ in how the clipped sum is computed:

* ``"hooks"``: Opacus keeps every example's gradient of every layer (``p.grad_sample``); the
  optimizer takes the norms, clips and sums. Works with any training loop.
* ``"ghost"``: Opacus' fast gradient clipping (Lee & Kifer 2021) with ghost clipping (Li et al.
  2022): the first backward pass only yields each example's gradient norm (Linear and Embedding
  layers never materialise per-example gradients at all), then the loss reweighted by each
  example's clipping factor is backpropagated once more, which gives the clipped sum directly.
* ``"bookkeeping"``: the same norms and clipped sum from a single backward pass
  (:mod:`privacy.bookkeeping`), for models made only of Linear and Conv2d layers.

Both ghost modes need per-example losses: the training loop computes the loss with the
wrapped criterion that :func:`privacy.make_private` returns.

:func:`choose_clipping` picks the fastest that applies and says why the others do not.
:func:`refuse_unclipped_steps` makes the optimizer of a ghost mode refuse a step whose gradient
did not come from the wrapped criterion: a plain ``loss.backward()`` would leave the
*unclipped* mean gradient in ``p.grad``, and Opacus' ghost optimizer would noise and apply it,
with no guarantee.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from secagg.errors import ConfigError, PrivacyError

log = logging.getLogger("secagg.dpsgd")

ClippingMode = Literal["auto", "hooks", "ghost", "bookkeeping"]
MODES = ("auto", "hooks", "ghost", "bookkeeping")


@dataclass(frozen=True)
class ClippingChoice:
    """The per-example clipping a :class:`~privacy.dpsgd.PrivateTraining` uses, and why."""

    mode: Literal["hooks", "ghost", "bookkeeping"]
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
    norms = ", ".join(f"{n} x {t}" for t, n in sorted(ghost.items())) or "none"
    others = ", ".join(f"{n} x {t}" for t, n in sorted(per_example.items())) or "none"
    return (f"every trainable layer is supported and the loss is per-example; ghost norms for "
            f"{norms}; per-example gradient norms (fast gradient clipping) for {others}")


def choose_clipping(model: nn.Module, criterion: Any, requested: str = "auto") -> ClippingChoice:
    """The fastest per-example clipping that applies to ``model`` and ``criterion``; logged.

    ``"auto"``: single-pass ghost clipping (``"bookkeeping"``) where the model is made of
    Linear and Conv2d layers, else Opacus' ghost clipping where it applies, else hooks.
    ``"ghost"`` / ``"bookkeeping"`` refuse (ConfigError, naming every obstacle) where they
    cannot run; ``"hooks"`` always uses hooks.
    """
    from privacy.bookkeeping import bookkeeping_obstacles

    if requested not in MODES:
        raise ConfigError(f"grad_sample_mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "hooks":
        choice = ClippingChoice("hooks", "grad_sample_mode='hooks' was asked for")
    else:
        obstacles = _ghost_obstacles(model, criterion)
        single_pass = obstacles + bookkeeping_obstacles(model)
        blocking = {"ghost": obstacles, "bookkeeping": single_pass}.get(requested)
        if blocking:
            raise ConfigError(f"grad_sample_mode={requested!r} cannot be used: "
                              + "; ".join(blocking)
                              + ". Use grad_sample_mode='auto' to fall back to what applies.")
        if obstacles:
            choice = ClippingChoice("hooks", "ghost clipping does not apply: " + "; ".join(obstacles))
        elif requested == "ghost" or single_pass:
            why = ("grad_sample_mode='ghost' was asked for" if requested == "ghost" else
                   "single-pass ghost clipping does not apply: " + "; ".join(single_pass))
            choice = ClippingChoice("ghost", f"{_ghost_summary(model)}; {why}")
        else:
            choice = ClippingChoice("bookkeeping", (
                "every trainable layer is Linear or Conv2d and the loss is per-example: ghost "
                "norms for Linear, per-example norms for Conv2d, clipped sum in one backward pass"))
    log.info("DP-SGD per-example clipping: %s (%s)", choice.mode, choice.reason)
    return choice


def refuse_unclipped_steps(optimizer: Any, on_zero_grad: Callable[[], None] | None = None
                           ) -> Callable[[], None]:
    """Make ``optimizer`` refuse a step unless the returned ``mark_clipped`` was called since.

    The ghost criteria call ``mark_clipped`` once the clipped gradient sum is in ``p.grad``
    (Opacus' two-pass backward reads the clipping factors after clearing the gradients; the
    single-pass one calls it at its end). ``zero_grad`` and every step reset the mark;
    ``on_zero_grad`` runs at each ``zero_grad`` too.
    """
    state = {"clipped": False}
    zero_grad, pre_step = optimizer.zero_grad, optimizer.pre_step

    def mark_clipped() -> None:
        state["clipped"] = True

    def cleared(set_to_none: bool = False) -> None:
        state["clipped"] = False
        if on_zero_grad is not None:
            on_zero_grad()
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

    optimizer.zero_grad = cleared
    optimizer.pre_step = checked_pre_step
    return mark_clipped


def mark_when_factors_read(module: Any, mark_clipped: Callable[[], None]) -> None:
    """Opacus' ghost backward: call ``mark_clipped`` when it reads the clipping factors."""
    coef = module.get_clipping_coef

    def clipping_coef() -> Any:
        factors = coef()
        mark_clipped()
        return factors

    module.get_clipping_coef = clipping_coef
