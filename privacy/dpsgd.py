"""DP-SGD client training with Opacus.

Two entry points:

* :func:`make_private` wraps a user's model, optimizer and data loader (Opacus
  ``PrivacyEngine``: Poisson sampling, per-sample clipping, Gaussian noise) and returns a
  :class:`PrivateTraining` with named fields -- never a tuple whose arity depends on a flag.
  The returned objects act like their non-private counterparts; using any other model,
  optimizer or data loader for training invalidates the stated guarantee.
  Per-example clipping is ghost clipping where the model and loss allow it (in one backward
  pass for Linear/Conv2d models, else Opacus' two), else Opacus hooks (:mod:`privacy.clipping`:
  same clipped, noised step; the choice is logged).
* :func:`train_private` runs one client's local training (e.g. one federated round) and
  returns :class:`TrainStats`, including the record-level privacy event to put in a ledger.

Models are checked with Opacus ``ModuleValidator`` first: BatchNorm mixes examples of a
batch, so per-example gradients (and the guarantee) would be wrong. We refuse such a model
with a clear error, or, with ``fix_model=True``, replace BatchNorm by GroupNorm (and
rebuild the optimizer over the new parameters).

Device: ``device="cpu"``, ``"cuda"`` (refused with a clear error when no GPU is present) or
``"auto"`` (``cuda`` when available, else ``cpu``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from privacy._checks import (
    check_delta,
    check_noise_multiplier,
    check_positive,
    check_positive_int,
)
from privacy.accountant import AccountantName, epsilon_of_events
from privacy.clipping import (
    ClippingChoice,
    choose_clipping,
    mark_when_factors_read,
    refuse_unclipped_steps,
)
from privacy.events import SampledGaussianEvent, dpsgd_event
from secagg.errors import ConfigError, UnsupportedEventError


def os_seeded_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 fresh bits from ``os.urandom``."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def secure_noise(optimizer: Any, data_loader: Any, *, seed: int | None = None) -> None:
    """Make an Opacus ``DPOptimizer`` and its Poisson ``DPDataLoader`` draw from the OS.

    Without ``torchcsprng`` (which Opacus' own ``secure_mode`` needs): the optimizer's noise
    generator is replaced by one freshly seeded from ``os.urandom`` before every noise draw
    (so no generator state spans two steps), and Opacus' secure-mode sampler is switched on:
    each coordinate is the sum of 2n = 4 Gaussians, halved, the defence of Holohan & Braghin
    2021 against the floating-point attacks of Mironov 2012 / Jin et al. 2022. The Poisson
    sampler of records draws from a generator seeded from ``os.urandom`` too (which records
    are in a batch must be unpredictable for amplification by sampling).

    ``seed`` (tests only) derives both from the seed instead: reproducible and not private.
    """
    optimizer.secure_mode = True
    sampler = getattr(data_loader, "batch_sampler", None)
    device = getattr(getattr(optimizer, "params", [None])[0], "device", "cpu") if getattr(
        optimizer, "params", None) else "cpu"
    if seed is not None:
        optimizer.generator = torch.Generator(device=device).manual_seed(seed + 1)
        if sampler is not None and hasattr(sampler, "generator"):
            sampler.generator = torch.Generator().manual_seed(seed + 2)
        return
    if sampler is not None and hasattr(sampler, "generator"):
        sampler.generator = os_seeded_generator()
    draw = optimizer.add_noise

    def add_noise_from_os() -> None:
        optimizer.generator = os_seeded_generator(device)
        draw()

    optimizer.add_noise = add_noise_from_os


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda when available; ``"cuda"`` without a GPU -> ConfigError."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name!r} was asked for but no CUDA GPU is available; "
            "use device='cpu' or device='auto'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return dev


def validate_model(model: nn.Module, *, fix: bool = False) -> nn.Module:
    """Check ``model`` is DP-SGD compatible; with ``fix=True`` return a repaired copy.

    Raises :class:`ConfigError` listing every incompatible layer and why.
    """
    from opacus.validators import ModuleValidator

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    if fix:
        fixed = ModuleValidator.fix(model)
        remaining = ModuleValidator.validate(fixed, strict=False)
        if not remaining:
            return fixed
        errors = remaining
    lines = "\n".join(f"  - {e}" for e in errors)
    hint = (
        "" if fix else
        " Pass fix_model=True to replace BatchNorm by GroupNorm automatically, or change the model."
    )
    raise ConfigError(
        f"model is not compatible with DP-SGD ({len(errors)} problem(s)): per-example gradients "
        f"must not depend on other examples of the batch.{hint}\n{lines}"
    )


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns. Train with exactly these objects.

    ``criterion`` computes the loss to backpropagate: with ghost clipping (``clipping.mode``
    ``"ghost"`` or ``"bookkeeping"``) it is a per-example criterion whose ``backward()`` leaves
    the clipped gradient sum, and the optimizer refuses a gradient that did not come from it;
    with hooks it is the criterion given to :func:`make_private` (or None if none was).
    ``clipping`` says which clipping was chosen and why.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    dataset_size: int
    device: torch.device
    criterion: Callable[..., Any] | None
    clipping: ClippingChoice
    privacy_engine: Any = field(repr=False)
    poisson_sampling: bool = True
    detach_clipping: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        """Number of noisy optimizer steps taken so far (not compressed runs)."""
        return sum(int(n) for _, _, n in self.privacy_engine.accountant.history)

    def event(self) -> SampledGaussianEvent:
        """Record-level privacy event of all steps taken so far.

        Refused for shuffled fixed-size batches (``poisson_sampling=False``): recording a
        Poisson-sampled event for them would state an epsilon nobody proved.
        """
        if not self.poisson_sampling:
            raise UnsupportedEventError(
                "this training used shuffled fixed-size batches (poisson_sampling=False); the "
                "Poisson-subsampled Gaussian event does not describe it and no accountant here "
                "bounds it: train with poisson_sampling=True to get an epsilon"
            )
        return dpsgd_event(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            steps=self.steps, max_grad_norm=self.max_grad_norm,
        )

    def epsilon(self, delta: float, *, accountant: AccountantName = "prv") -> float:
        """Record-level epsilon spent so far at ``delta`` (checks ``delta < 1/n``)."""
        delta = check_delta(delta, dataset_size=self.dataset_size)
        return epsilon_of_events([self.event()], delta=delta, accountant=accountant)

    def close(self) -> None:
        """Remove Opacus hooks so the underlying model can be reused (e.g. next round)."""
        if self.detach_clipping is not None:
            self.detach_clipping()
        remove = getattr(self.model, "remove_hooks", None)
        if callable(remove):
            try:
                remove()
            except ValueError:
                pass  # already removed
        inner = getattr(self.model, "_module", self.model)
        for p in inner.parameters():
            if hasattr(p, "grad_sample"):
                p.grad_sample = None
            if hasattr(p, "_norm_sample"):  # ghost clipping's per-example norms
                p._norm_sample = None
            p.grad = None


def _dataset_size(data_loader: DataLoader) -> int:
    try:
        return len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(
            "data_loader.dataset must have a length (a map-style dataset): Poisson sampling "
            "needs the number of records"
        ) from exc


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    device: str | torch.device = "cpu",
    secure_mode: bool = True,
    fix_model: bool = False,
    poisson_sampling: bool = True,
    grad_sample_mode: str = "auto",
    seed: int | None = None,
    criterion: Callable[..., torch.Tensor] | None = None,
) -> PrivateTraining:
    """Wrap ``model``, ``optimizer`` and ``data_loader`` for DP-SGD with Opacus.

    Cross-checks before wrapping: the optimizer must optimize exactly the model's
    parameters; the model must pass ``ModuleValidator`` (or ``fix_model=True``).

    ``secure_mode=True`` (the default) draws the noise and the Poisson batches from the
    operating system with a floating-point defence (:func:`secure_noise`; ``torchcsprng`` is
    not needed). ``secure_mode=False`` uses torch's default generator: experiments only.

    ``poisson_sampling=False`` trains on shuffled fixed-size batches. No accountant here
    bounds that sampling scheme, so such a run has no privacy event: :meth:`PrivateTraining.event`
    and :meth:`PrivateTraining.epsilon` refuse it (use it only to test mechanics or time steps).

    Per-example clipping (:mod:`privacy.clipping`): ``grad_sample_mode="auto"`` (the default)
    uses ghost clipping when ``criterion`` is a torch loss with mean reduction and every
    trainable layer is supported -- in one backward pass (``"bookkeeping"``) for models of
    Linear and Conv2d layers, else Opacus' two-pass ghost clipping -- and hooks otherwise; the
    choice and its reason are logged (logger ``secagg.dpsgd``) and kept in
    :attr:`PrivateTraining.clipping`. With ghost clipping the loss must be computed by
    :attr:`PrivateTraining.criterion`. ``"hooks"``, ``"ghost"`` and ``"bookkeeping"`` force one
    (ConfigError where it cannot run). All clip and noise alike: same step, same accounting.

    ``seed`` (deterministic test runs only, with ``secure_mode=False``): the noise and the
    Poisson batches follow it (:func:`secure_noise` with a seed): reproducible, not private.
    """
    if seed is not None and secure_mode:
        raise ConfigError("a seed makes the DP-SGD noise predictable: pass secure_mode=False with it "
                          "(deterministic test runs only), or drop the seed")
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    max_grad_norm = check_positive(max_grad_norm, name="max_grad_norm")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(data_loader, DataLoader):
        raise ConfigError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    dev = resolve_device(device)

    model_params = {id(p) for p in model.parameters() if p.requires_grad}
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if model_params != opt_params:
        raise ConfigError(
            "the optimizer does not optimize exactly the model's trainable parameters; build it "
            "as optimizer = SGD(model.parameters(), ...) for this model"
        )
    checked = validate_model(model, fix=fix_model)
    if checked is not model:  # BatchNorm was replaced: the optimizer must follow the new params
        defaults = {k: v for k, v in optimizer.defaults.items() if k != "params"}
        optimizer = type(optimizer)(checked.parameters(), **defaults)
        model = checked
    model.to(dev)
    n = _dataset_size(data_loader)
    if n == 0:
        raise ConfigError("data_loader.dataset is empty; a client needs at least one record")
    clipping = choose_clipping(model, criterion, grad_sample_mode)
    opacus_criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)  # see secure_noise below
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            criterion=opacus_criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            grad_sample_mode="hooks" if clipping.mode == "hooks" else "ghost",
        )
    detach_clipping = None
    if clipping.mode == "hooks":
        p_model, p_opt, p_loader = wrapped
    else:  # both ghost modes: Opacus' ghost optimizer noises the clipped sum left in p.grad
        p_model, p_opt, criterion, p_loader = wrapped
        if clipping.mode == "ghost":
            mark_when_factors_read(p_model, refuse_unclipped_steps(p_opt))
        else:
            from privacy.bookkeeping import BookkeepingClipper, BookkeepingLoss

            p_model.remove_hooks()  # the single backward pass replaces Opacus' two
            mark_clipped = refuse_unclipped_steps(p_opt, on_zero_grad=lambda: clipper.forget())
            clipper = BookkeepingClipper(model, max_grad_norm, on_clipped=mark_clipped)
            criterion = BookkeepingLoss(clipper, opacus_criterion)
            detach_clipping = clipper.remove
    if secure_mode or seed is not None:
        secure_noise(p_opt, p_loader, seed=seed)
    if not secure_mode:
        warnings.warn(
            ("DP-SGD noise follows a fixed seed" if seed is not None else
             "DP-SGD noise comes from torch's default (non-cryptographic) generator")
            + ": fine for experiments; use secure_mode=True before production",
            RuntimeWarning,
            stacklevel=2,
        )
    batch_size = data_loader.batch_size or 1
    sample_rate = 1.0 / len(p_loader) if poisson_sampling else min(1.0, batch_size / n)
    if not poisson_sampling:
        warnings.warn(
            "poisson_sampling=False: shuffled fixed-size batches are not what the accountants "
            "bound; this training has no privacy event and no epsilon",
            RuntimeWarning, stacklevel=2,
        )
    return PrivateTraining(
        model=p_model, optimizer=p_opt, data_loader=p_loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        sample_rate=float(sample_rate), dataset_size=n, device=dev, privacy_engine=engine,
        poisson_sampling=poisson_sampling, criterion=criterion, clipping=clipping,
        detach_clipping=detach_clipping,
    )


@dataclass(frozen=True)
class TrainStats:
    """Result of :func:`train_private` (one client's local training)."""

    epochs: int
    steps: int
    samples: int
    mean_loss: float
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    dataset_size: int
    device: str
    seconds: float
    event: SampledGaussianEvent
    epsilon: float | None = None
    delta: float | None = None


def train_private(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    device: str | torch.device = "cpu",
    momentum: float = 0.0,
    delta: float | None = None,
    accountant: AccountantName = "prv",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    secure_mode: bool = True,
    fix_model: bool = False,
) -> TrainStats:
    """Train ``model`` in place with DP-SGD (SGD optimizer) for ``epochs`` epochs.

    The model's parameters are updated in place and Opacus hooks are removed afterwards,
    so the same model can be trained again next round. ``loader`` yields ``(x, y)``
    batches; ``loss_fn`` defaults to cross-entropy (a torch loss with mean reduction lets
    :func:`make_private` choose ghost clipping; any other callable trains with hooks). With
    ``delta`` the record-level epsilon of this call is computed by ``accountant``. Not compatible with
    ``fix_model=True`` when the caller needs its own model object updated (the fixed
    model is a copy); fix the model beforehand with :func:`validate_model`.
    """
    epochs = check_positive_int(epochs, name="epochs")
    lr = check_positive(lr, name="lr")
    if delta is not None:
        delta = check_delta(delta, dataset_size=_dataset_size(loader))
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*default \\(non-cryptographic\\).*")
        private = make_private(
            model=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, device=device,
            secure_mode=secure_mode, fix_model=fix_model, criterion=loss_fn,
        )
    start = time.perf_counter()
    total_loss, samples = 0.0, 0
    try:
        private.model.train()
        for _ in range(epochs):
            for x, y in private.data_loader:
                x, y = x.to(private.device), y.to(private.device)
                private.optimizer.zero_grad(set_to_none=True)
                out = private.model(x)
                # Poisson sampling can draw an empty batch; it is still a (noise-only) DP step.
                # The mean loss over no example is NaN, so hooks take a zero loss instead; the
                # ghost criterion handles it (its per-example losses are simply empty).
                if len(x) == 0 and private.clipping.mode == "hooks":
                    loss = out.sum()
                else:
                    loss = private.criterion(out, y)
                    total_loss += float(loss.detach()) * len(x)
                    samples += len(x)
                loss.backward()
                private.optimizer.step()
        event = private.event()
    finally:
        private.close()
    eps = (
        epsilon_of_events([event], delta=delta, accountant=accountant)
        if delta is not None else None
    )
    return TrainStats(
        epochs=epochs, steps=event.steps, samples=samples,
        mean_loss=total_loss / max(samples, 1), sample_rate=private.sample_rate,
        noise_multiplier=private.noise_multiplier, max_grad_norm=private.max_grad_norm,
        dataset_size=private.dataset_size, device=str(private.device),
        seconds=time.perf_counter() - start, event=event, epsilon=eps, delta=delta,
    )
