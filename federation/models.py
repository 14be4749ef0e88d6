"""DP-compatible models: every layer has per-sample gradients in Opacus, and there is no
BatchNorm (it mixes samples within a batch, which breaks per-sample clipping); the CNN uses
GroupNorm instead.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from secagg.errors import ConfigError

MODELS = ("logreg", "mlp", "cnn", "tanh-cnn", "mf")


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (softmax over ``num_classes`` logits)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """One hidden layer with ReLU."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class GroupNormCNN(nn.Module):
    """Two 5x5 conv blocks (conv, GroupNorm, ReLU, max-pool) and a linear head, for 28x28 images."""

    def __init__(self, num_classes: int, channels: tuple[int, int] = (16, 32), groups: int = 4) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5), nn.GroupNorm(groups, c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.GroupNorm(groups, c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TanhCNN(nn.Module):
    """The DP-SGD MNIST CNN of Papernot et al. 2021 / Tramer & Boneh 2021 (26,010 parameters for
    10 classes): two strided convolutions and a small linear head, tanh activations, no
    normalisation layer. Tanh keeps activations bounded, which suits the small clipping norms
    (around 0.1) that DP-SGD trains best with; it is the model of ``benchmarks/bench_dpsgd_mnist.py``.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        )
        self.head = nn.Sequential(nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 64) -> nn.Module:
    """Build a model by name for inputs of ``input_shape`` (without the batch dimension).

    ``name`` is a built-in model or ``"package.module:function"``: a function of no arguments
    returning the caller's own ``nn.Module`` (so an experiment TOML, read by the server and by
    every ``secagg join`` site, can name it).
    """
    from federation.config import is_import_path

    if is_import_path(name):
        from federation.custom import load_app

        model = load_app(name, what="model")()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model {name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    in_features = int(np.prod(input_shape))
    if name == "logreg":
        return LogisticRegression(in_features, num_classes)
    if name == "mlp":
        return MLP(in_features, num_classes, hidden)
    if name == "cnn":
        if tuple(input_shape) != (1, 28, 28):
            raise ConfigError(f"model 'cnn' expects 1x28x28 images, got input shape {input_shape}")
        return GroupNormCNN(num_classes)
    if name == "tanh-cnn":
        if tuple(input_shape) != (1, 28, 28):
            raise ConfigError(f"model 'tanh-cnn' expects 1x28x28 images, got input shape {input_shape}")
        return TanhCNN(num_classes)
    if name == "mf":  # the shared item table of matrix factorisation: items = num_classes, dim = hidden
        from federation.recsys.model import ItemTable

        return ItemTable(num_classes, hidden)
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def get_flat(model: nn.Module) -> np.ndarray:
    """All trainable parameters as one float32 vector (the order of ``model.parameters()``)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().astype(np.float32)


def set_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Load a copy of a vector produced by :func:`get_flat` into ``model`` (never aliases it)."""
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.tensor(flat, dtype=torch.float32), model.parameters())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
