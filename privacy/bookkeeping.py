"""Ghost clipping in one backward pass ("book-keeping", Bu, Wang, Zha & Karypis 2023).

Opacus' ghost clipping backpropagates twice: once for each example's gradient norm, once for
the loss reweighted by each example's clipping factor. The second pass is redundant for
layers whose weight gradient is a product of the layer's input ``A`` and the gradient ``G``
of its output: example ``i``'s gradient is ``G_i^T A_i``, so the clipped sum is
``sum_i c_i G_i^T A_i`` -- one matrix product with ``G`` scaled by ``c``. Here one backward
pass computes only the gradients of the layers' outputs (no weight gradients), then:

* ``nn.Linear`` on ``(batch, features)``: the ghost norm ``|G_i| |A_i|`` (no per-example
  gradient is formed); clipped sum ``(c G)^T A``;
* ``nn.Conv2d`` (``groups=1``, zero padding): per-example gradients from the unfolded input
  (``F.unfold``, one batched product), their norms, and the clipped sum ``sum_i c_i g_i``;

with ``c_i = min(1, C / (norm_i + 1e-6))``, Opacus' factor. The clipped sum goes to ``p.grad``
and Opacus' ghost optimizer adds the noise, scales and accounts, exactly as after its own two
passes, so the step is the same (tested against hooks to float tolerance).
:func:`bookkeeping_obstacles` says which models this covers; others use Opacus' ghost or hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secagg.errors import ConfigError

_LAYERS = (nn.Linear, nn.Conv2d)


def bookkeeping_obstacles(model: nn.Module) -> list[str]:
    """Why :class:`BookkeepingClipper` cannot run ``model`` (empty: it can)."""
    from opacus.utils.module_utils import trainable_modules

    problems = []
    for name, m in trainable_modules(model):
        label = f"{name or '<model>'} ({type(m).__name__})"
        if type(m) not in _LAYERS:
            problems.append(f"{label} is not a Linear or Conv2d layer")
        elif isinstance(m, nn.Conv2d) and (
                m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            problems.append(f"{label} has groups, non-zero or 'same'/'valid' padding")
        elif not all(p.requires_grad for p in m.parameters(recurse=False)):
            problems.append(f"{label} has frozen parameters")
    return problems


class BookkeepingClipper:
    """Per-example clipped gradient sum of ``model``'s Linear and Conv2d layers, one pass.

    Forward hooks keep each layer's input and output during training; :meth:`backward`
    turns the per-example losses into ``p.grad = sum_i c_i g_i`` and calls ``on_clipped``.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float,
                 on_clipped: Callable[[], None]) -> None:
        from opacus.utils.module_utils import trainable_modules

        self.max_grad_norm = max_grad_norm
        self.on_clipped = on_clipped
        self.layers = [m for _, m in trainable_modules(model)]
        self.seen: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]] = {}
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._keep) for m in self.layers]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            a = inputs[0].detach()  # shares the input's version counter
            self.seen.setdefault(module, []).append((a, output, (a._version, output._version)))

    def forget(self) -> None:
        """Drop what the last forward pass kept (called by ``zero_grad``)."""
        self.seen.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self.handles:
            handle.remove()
        self.forget()

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        """Set every trainable parameter's ``grad`` to the sum of clipped per-example gradients."""
        runs = [len(self.seen.get(m, [])) for m in self.layers]
        if any(r != 1 for r in runs):
            self.forget()
            raise ConfigError(
                "each layer must run exactly once between optimizer.zero_grad() and the backward "
                f"pass (got {runs} for {len(self.layers)} layers): shared layers are not supported "
                "by single-pass ghost clipping; call zero_grad() before each training step or "
                "use grad_sample_mode='ghost'"
            )
        kept = [self.seen[m][0] for m in self.layers]
        self.forget()
        if any((a._version, out._version) != versions for a, out, versions in kept):
            raise ConfigError(
                "a Linear or Conv2d layer's input or output was modified in place after the layer "
                "ran (e.g. nn.ReLU(inplace=True)); single-pass ghost clipping needs both as they "
                "were: use out-of-place activations or grad_sample_mode='ghost'"
            )
        outputs = [out for _, out, _ in kept]
        grads = torch.autograd.grad(loss_per_sample.sum(), outputs, allow_unused=True)
        parts, squares = [], []
        for m, (a, out, _), g in zip(self.layers, kept, grads):
            g = torch.zeros_like(out) if g is None else g.detach()
            part, square = self._norms(m, a, g)
            parts.append(part)
            squares.append(square)
        norms = torch.stack(squares).sum(0).sqrt()
        self.per_sample_gradient_norms = norms
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for m, part in zip(self.layers, parts):
            self._clipped_sum(m, part, factors)
        self.on_clipped()

    @staticmethod
    def _norms(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """What the clipped sum needs, and each example's squared gradient norm of ``m``."""
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                            stride=m.stride)  # (n, in * kh * kw, positions)
            g = g.flatten(2)  # (n, out, positions)
            per_example = torch.bmm(g, cols.transpose(1, 2))  # (n, out, in * kh * kw)
            bias = g.sum(2)
            square = per_example.flatten(1).pow(2).sum(1)
            if m.bias is not None:
                square = square + bias.pow(2).sum(1)
            return ("per_example", per_example, bias), square
        if a.dim() == 2:  # ghost norm: |G_i^T A_i| = |G_i| |A_i| for one row per example
            g_square = g.pow(2).sum(1)
            square = g_square * a.pow(2).sum(1)
            if m.bias is not None:
                square = square + g_square
            return ("ghost", g, a), square
        per_example = torch.einsum("n...o,n...i->noi", g, a)
        bias = g.flatten(1, -2).sum(1)
        square = per_example.flatten(1).pow(2).sum(1)
        if m.bias is not None:
            square = square + bias.pow(2).sum(1)
        return ("per_example", per_example, bias), square

    @staticmethod
    def _clipped_sum(m: nn.Module, part: Any, factors: torch.Tensor) -> None:
        kind, x, y = part
        if kind == "ghost":
            scaled = x * factors[:, None]
            m.weight.grad = scaled.T @ y
            if m.bias is not None:
                m.bias.grad = scaled.sum(0)
            return
        m.weight.grad = torch.einsum("n,n...->...", factors, x).reshape(m.weight.shape)
        if m.bias is not None:
            m.bias.grad = factors @ y


class BookkeepingLoss:
    """The criterion of single-pass ghost clipping: ``loss = criterion(out, y); loss.backward()``."""

    def __init__(self, clipper: BookkeepingClipper, criterion: nn.modules.loss._Loss) -> None:
        self.clipper = clipper
        self.criterion = criterion

    def __call__(self, *args: Any, **kwargs: Any) -> BookkeepingTensor:
        reduction = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            per_sample = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = reduction
        return BookkeepingTensor(self.clipper, per_sample)


class BookkeepingTensor:
    """Per-example losses; ``backward()`` leaves the clipped gradient sum in ``p.grad``."""

    def __init__(self, clipper: BookkeepingClipper, loss_per_sample: torch.Tensor) -> None:
        self.clipper = clipper
        self.loss_per_sample = loss_per_sample

    def detach(self) -> torch.Tensor:
        """The batch's mean loss (the value a plain criterion would return)."""
        return self.loss_per_sample.detach().mean()

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        self.clipper.backward(self.loss_per_sample)
