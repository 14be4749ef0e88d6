"""Local training on one client (plain SGD, FedProx, or DP-SGD through privacy.make_private).

This is the step a distributed backend runs remotely: :func:`train_client` takes only plain
values (a model builder, the global parameter vector, the client's arrays and a
:class:`LocalTraining`), touches no engine state and returns a :class:`ClientUpdate`.

The FedProx proximal term mu/2 ||w - x||^2 is applied as a decoupled step after each optimizer
step (w <- w - lr * mu * (w - x)). Its gradient does not depend on the data, so under DP-SGD it
is applied after clipping and noising and costs no privacy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from federation.models import get_flat, set_flat
from secagg.errors import ConfigError


@dataclass(frozen=True)
class LocalTraining:
    """How each client trains in a round.

    With ``dp_sgd`` the client runs DP-SGD with Poisson sampling at rate batch_size / n and
    per-sample clipping to ``max_grad_norm`` (record-level DP for its own data).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    proximal_mu: float = 0.0
    dp_sgd: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    #: the caller's loss ``loss(output, y) -> scalar tensor`` (mean over the batch); None:
    #: cross-entropy over class logits
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: the caller's training step ``train(model, loader) -> mean loss | None`` (see
    #: federation.custom.TrainHook); None: SGD on ``loss``
    train: Callable[[nn.Module, torch.utils.data.DataLoader], float | None] | None = None
    #: DP-SGD noise and Poisson batches from os.urandom (privacy.dpsgd.secure_noise); False
    #: only for deterministic test runs, where they follow the task's seed
    secure_noise: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("local training needs epochs >= 1, batch_size >= 1 and lr > 0")
        if self.dp_sgd and (self.noise_multiplier < 0 or self.max_grad_norm <= 0):
            raise ConfigError("DP-SGD needs noise_multiplier >= 0 and max_grad_norm > 0")
        if self.dp_sgd and self.train is not None:
            raise ConfigError(
                "a custom train= hook runs its own optimizer, so DP-SGD cannot be guaranteed for it; "
                "drop train= (the engine then runs DP-SGD with your loss=) or use dp = 'user' "
                "(the update is clipped and noised after your training)")

    def sample_rate(self, num_samples: int) -> float:
        return min(1.0, self.batch_size / max(num_samples, 1))

    def steps(self, num_samples: int) -> int:
        """Optimizer steps per round: epochs x ceil(n / batch_size) (expected, under Poisson)."""
        return self.epochs * -(-num_samples // self.batch_size)


@dataclass(frozen=True)
class ClientUpdate:
    """What a client computed in one round, before protection. ``delta`` never leaves the
    client in clear: the engine hands it to the aggregator, which protects it."""

    client: int
    delta: np.ndarray
    num_samples: int
    loss: float
    steps: int
    sample_rate: float


def train_client(
    build: Callable[[], nn.Module],
    global_params: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    config: LocalTraining,
    *,
    client: int,
    seed: int | None = None,
) -> ClientUpdate:
    """Train a fresh copy of the global model on (x, y); return delta = local - global.

    ``seed`` fixes batch order for reproducible experiments; None draws it from torch's
    default generator. DP-SGD noise and Poisson batches come from ``os.urandom`` unless
    ``config.secure_noise`` is False (deterministic test runs: then from ``seed``).
    """
    model = build()
    set_flat(model, global_params)
    anchor = [p.detach().clone() for p in model.parameters()]
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=gen
    )
    if config.train is not None:
        return _train_with_hook(model, global_params, loader, len(y), config, client)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    train_model: nn.Module = model
    if config.dp_sgd:
        from privacy import make_private

        with warnings.catch_warnings():
            # a deterministic run is marked as such in the ledger: no warning per client and round
            warnings.filterwarnings("ignore", message="DP-SGD noise follows a fixed seed")
            private = make_private(
                model=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
                secure_mode=config.secure_noise,
                seed=None if config.secure_noise else (0 if seed is None else seed),
            )
        train_model, optimizer, loader = private.model, private.optimizer, private.data_loader
    params = list(model.parameters())
    train_model.train()
    with warnings.catch_warnings():
        # Opacus' hooks fire on inputs that need no gradient; harmless, and once per batch.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss_sum, batches, steps = _local_loop(train_model, params, anchor, loader, optimizer, config)
    delta = get_flat(model) - global_params
    return ClientUpdate(
        client=client, delta=delta.astype(np.float32), num_samples=len(y),
        loss=loss_sum / max(batches, 1), steps=steps, sample_rate=config.sample_rate(len(y)),
    )


def _train_with_hook(model: nn.Module, global_params: np.ndarray, loader, num_samples: int,
                     config: LocalTraining, client: int) -> ClientUpdate:
    """Run the caller's ``train(model, loader)``; the update is what it did to the model."""
    model.train()
    loss = config.train(model, loader)  # type: ignore[misc]  # checked by the caller
    if loss is not None and not isinstance(loss, (int, float)):
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = float(loss.detach())
        else:
            raise ConfigError(f"the train hook returned {type(loss).__name__}; return the mean loss "
                              "(a float) or None")
    delta = get_flat(model) - global_params
    if not np.all(np.isfinite(delta)):
        raise ConfigError(f"client {client}: the train hook produced NaN or infinite weights; "
                          "lower the learning rate")
    epochs_steps = config.steps(num_samples)
    return ClientUpdate(client=client, delta=delta.astype(np.float32), num_samples=num_samples,
                        loss=float("nan") if loss is None else float(loss), steps=epochs_steps,
                        sample_rate=config.sample_rate(num_samples))


def _local_loop(train_model, params, anchor, loader, optimizer, config: LocalTraining) -> tuple[float, int, int]:
    criterion = config.loss if config.loss is not None else nn.CrossEntropyLoss()
    total_loss, batches, steps = 0.0, 0, 0
    for _ in range(config.epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(yb) == 0:  # a Poisson batch can be empty; DP-SGD still takes a (noise) step
                loss = train_model(xb).sum() * 0.0
            else:
                loss = criterion(train_model(xb), yb)
                total_loss += float(loss.detach())
                batches += 1
            loss.backward()
            optimizer.step()
            steps += 1
            if config.proximal_mu:
                with torch.no_grad():
                    for p, a in zip(params, anchor):
                        p.sub_(config.lr * config.proximal_mu * (p - a))
    return total_loss, batches, steps


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 2048,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float | None, float | None]:
    """(accuracy, mean loss) of ``model`` on (x, y); (None, None) without test records.

    ``loss`` is the training loss (mean over a batch; None: cross-entropy). Accuracy is the
    share of argmax predictions equal to integer labels, and None when the model does not
    output class scores (e.g. regression).
    """
    if len(y) == 0:
        return None, None
    model.eval()
    correct, loss_sum, classify = 0, 0.0, True
    criterion = loss if loss is not None else nn.CrossEntropyLoss()
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = torch.as_tensor(x[start:start + batch_size])
            yb = torch.as_tensor(y[start:start + batch_size])
            out = model(xb)
            loss_sum += float(criterion(out, yb)) * len(yb)
            classify = classify and out.ndim == 2 and out.shape[1] > 1 and not yb.is_floating_point()
            if classify:
                correct += int((out.argmax(1) == yb).sum())
    return (correct / len(y) if classify else None), loss_sum / len(y)
