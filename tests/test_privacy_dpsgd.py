"""DP-SGD client training with Opacus, on CPU (GPU tests run where CUDA is present)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privacy
from privacy.dpsgd import (
    PrivateTraining,
    make_private,
    resolve_device,
    train_private,
    validate_model,
)
from secagg.errors import ConfigError, PrivacyError, UnsupportedEventError

pytestmark = pytest.mark.filterwarnings(
    "ignore:DP-SGD noise comes from", "ignore:.*full_backward_hook.*", "ignore:.*Secure RNG.*",
    "ignore:Using a non-full backward hook",
)


def _data(n=400, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _model(d=8):
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 2))


def test_train_private_learns_and_accounts():
    torch.manual_seed(0)
    ds = _data()
    model = _model()
    loader = DataLoader(ds, batch_size=50)
    stats = train_private(model, loader, epochs=4, lr=0.5, noise_multiplier=0.8,
                          max_grad_norm=1.0, device="cpu", delta=1e-3)
    assert stats.device == "cpu"
    assert stats.steps == 4 * len(loader) and stats.sample_rate == pytest.approx(1 / len(loader))
    assert stats.event.level.value == "record" and stats.event.clipping_norm == 1.0
    assert stats.epsilon == pytest.approx(privacy.epsilon(
        noise_multiplier=0.8, sample_rate=1 / len(loader), steps=stats.steps, delta=1e-3))
    with torch.no_grad():
        acc = (model(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean().item()
    assert acc > 0.8  # learned despite clipping + noise (chance is ~0.5)
    # hooks are gone: the same model trains again next round, and works without Opacus
    again = train_private(model, loader, epochs=1, lr=0.1, noise_multiplier=1.0,
                          max_grad_norm=1.0)
    assert again.steps == len(loader)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters())


def test_per_sample_clipping_bounds_the_update():
    # No noise, fixed batches, lr=1: the step equals the mean of clipped per-sample
    # gradients, so its norm is at most max_grad_norm whatever the loss scale.
    torch.manual_seed(0)
    ds = _data()
    ds = TensorDataset(ds.tensors[0] * 100.0, ds.tensors[1])  # huge gradients
    model = _model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    pt = make_private(model=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=64),
                      noise_multiplier=0.0, max_grad_norm=0.25, poisson_sampling=False)
    assert isinstance(pt, PrivateTraining)
    x, y = next(iter(pt.data_loader))
    pt.optimizer.zero_grad()
    nn.functional.cross_entropy(pt.model(x), y).backward()
    pt.optimizer.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < torch.linalg.vector_norm(after - before).item() <= 0.25 + 1e-6
    assert pt.steps == 1
    with pytest.raises(UnsupportedEventError):  # fixed batches: no Poisson event is stated
        pt.event()
    pt.close()


def test_noise_is_added():
    torch.manual_seed(0)
    ds = _data(d=64)  # 64 features: 1074 parameters, enough draws for the bound below
    updates = []
    for _ in range(2):
        model = _model(64)
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        pt = make_private(model=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=64),
                          noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        x, y = next(iter(pt.data_loader))
        pt.optimizer.zero_grad()
        nn.functional.cross_entropy(pt.model(x), y).backward()
        pt.optimizer.step()
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        pt.close()
    # same data and start point: only the Gaussian noise differs (std sigma*C/B per coordinate).
    # 1074 OS-drawn coordinates: the sample std is within 25 % of sqrt(2) sigma C / B except with
    # probability 2e-29 (chi-square), a false-failure rate below 1e-9 (with 178 it was 2.4e-6)
    diff = (updates[0] - updates[1]).std().item()
    assert diff == pytest.approx(2**0.5 * 1.0 * 1.0 / 64, rel=0.25)


def test_batchnorm_refused_with_explanation_or_fixed():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ConfigError, match="BatchNorm") as info:
        validate_model(model)
    assert "fix_model=True" in str(info.value) and "GroupNorm" in str(info.value)
    fixed = validate_model(model, fix=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    # make_private with fix_model rebuilds the optimizer over the new parameters
    ds = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 2, (64,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    pt = make_private(model=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=16),
                      noise_multiplier=1.0, max_grad_norm=1.0, fix_model=True)
    assert pt.optimizer.original_optimizer.defaults["momentum"] == 0.5
    pt.close()


def test_cross_checks_before_wrapping():
    ds = _data()
    model = _model()
    other = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="exactly the model's trainable parameters"):
        make_private(model=model, optimizer=other, data_loader=DataLoader(ds, batch_size=10),
                     noise_multiplier=1.0, max_grad_norm=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        make_private(model=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=10),
                     noise_multiplier=1.0, max_grad_norm=0.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        make_private(model=model, optimizer=opt, data_loader=DataLoader(ds, batch_size=10),
                     noise_multiplier=-0.5, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="1/n"):
        train_private(model, DataLoader(ds, batch_size=10), epochs=1, lr=0.1,
                      noise_multiplier=1.0, max_grad_norm=1.0, delta=0.01)


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_private_on_cuda():
    model = _model()
    stats = train_private(model, DataLoader(_data(), batch_size=50), epochs=1, lr=0.5,
                          noise_multiplier=1.0, max_grad_norm=1.0, device="cuda")
    assert stats.device.startswith("cuda")
    assert next(model.parameters()).device.type == "cuda"


def test_secure_mode_needs_no_csprng_and_draws_from_the_os():
    """secure_mode used to be a ConfigError without torchcsprng (so production runs went without);
    now it is the default and draws noise and Poisson batches from os.urandom."""
    updates = []
    for _ in range(2):
        torch.manual_seed(0)  # the global generator no longer decides anything
        model = _model()
        model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
        pt = make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                          data_loader=DataLoader(_data(), batch_size=64), noise_multiplier=1.0,
                          max_grad_norm=1.0, secure_mode=True)
        assert pt.optimizer.secure_mode  # 2n-Gaussian floating-point defence
        x, y = next(iter(pt.data_loader))
        pt.optimizer.zero_grad()
        nn.functional.cross_entropy(pt.model(x), y).backward()
        pt.optimizer.step()
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        pt.close()
    assert not torch.equal(updates[0], updates[1])


MNIST_DIR = Path(os.environ.get("SECAGG_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared/data/mnist"))


@pytest.mark.slow
def test_mnist_one_epoch_dpsgd():
    from privacy.datasets import load_mnist, mnist_available

    if not mnist_available(MNIST_DIR):
        pytest.skip(f"MNIST IDX files not found under {MNIST_DIR} (set SECAGG_MNIST_DIR)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_dpsgd import tanh_cnn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_mnist(MNIST_DIR)
    train = TensorDataset(torch.from_numpy(data["train_images"]).unsqueeze(1),
                          torch.from_numpy(data["train_labels"]))
    model = tanh_cnn()
    stats = train_private(model, DataLoader(train, batch_size=512), epochs=1, lr=0.5,
                          momentum=0.9, noise_multiplier=1.07, max_grad_norm=0.1, delta=1e-5)
    x, y = torch.from_numpy(data["test_images"]).unsqueeze(1), torch.from_numpy(data["test_labels"])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.7 and 0 < stats.epsilon < 1.0


# --- per-example clipping: ghost (Opacus fast gradient clipping) vs hooks -----------------------

def _conv_model():
    """Conv2d (per-example gradient norms under ghost) + Linear layers (ghost norms)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3))


def _images(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a few large inputs: their gradients exceed the clipping norm, the others do not
    x = torch.randn(n, 1, 8, 8, generator=g) * torch.where(torch.arange(n) % 3 == 0, 30.0, 0.3)[
        :, None, None, None]
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def _private_copy(mode, ds, *, noise_multiplier, poisson_sampling, seed=None, batch_size=32,
                  build=_conv_model):
    torch.manual_seed(0)  # the same initial weights for both modes
    model = build()
    pt = make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                      data_loader=DataLoader(ds, batch_size=batch_size),
                      noise_multiplier=noise_multiplier, max_grad_norm=2.0,
                      poisson_sampling=poisson_sampling, grad_sample_mode=mode,
                      criterion=nn.CrossEntropyLoss(), secure_mode=seed is None)
    if seed is not None:  # tests only: noise and Poisson batches drawn from this seed
        from privacy.dpsgd import secure_noise

        secure_noise(pt.optimizer, pt.data_loader, seed=seed)
    assert pt.clipping.mode == mode and pt.optimizer.secure_mode
    return model, pt


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _sequence_model():
    """A Linear layer on (batch, positions, features): per-example norms in one backward pass."""
    return nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 5, 3))


def _sequences(n=96, seed=1):
    images = _images(n, seed)
    return TensorDataset(images.tensors[0].reshape(n, 8, 8), images.tensors[1])


@pytest.mark.parametrize("ghost, build, data", [
    ("ghost", _conv_model, _images), ("bookkeeping", _conv_model, _images),
    ("bookkeeping", _sequence_model, _sequences),
])
def test_ghost_clipping_gives_the_hooks_clipped_step(ghost, build, data):
    ds = data()
    x, y = ds.tensors[0][:32], ds.tensors[1][:32]
    steps, norms = {}, {}
    for mode in ("hooks", ghost):
        model, pt = _private_copy(mode, ds, noise_multiplier=0.0, poisson_sampling=False,
                                  build=build)
        before = _flat(model)
        pt.optimizer.zero_grad()
        pt.criterion(pt.model(x), y).backward()
        if mode == "hooks":
            per_param = [p.grad_sample.flatten(1).norm(dim=1) for p in model.parameters()]
            norms[mode] = torch.stack(per_param).norm(dim=0)
        else:  # Opacus' ghost module, or the single-pass clipper, keeps the norms it clipped by
            keeper = pt.model if mode == "ghost" else pt.criterion.clipper
            norms[mode] = keeper.per_sample_gradient_norms.detach().clone()
        pt.optimizer.step()
        steps[mode] = _flat(model) - before  # lr 1, no noise: minus the mean clipped gradient
        pt.close()
    assert (norms["hooks"] > 2.0).any() and (norms["hooks"] < 2.0).any()  # clipping is active
    torch.testing.assert_close(norms[ghost], norms["hooks"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(steps[ghost], steps["hooks"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ghost", ["ghost", "bookkeeping"])
def test_ghost_clipping_gives_the_hooks_noised_steps_and_accounting(ghost):
    # Same seed: the same Poisson batches and the same noise draws (the secure-mode sampler,
    # four Gaussians per coordinate), so the noised steps must agree to float tolerance.
    ds = _images()
    final, pts = {}, {}
    for mode in ("hooks", ghost):
        model, pt = _private_copy(mode, ds, noise_multiplier=1.0, poisson_sampling=True, seed=7)
        for xb, yb in pt.data_loader:
            pt.optimizer.zero_grad()
            pt.criterion(pt.model(xb), yb).backward()
            pt.optimizer.step()
        final[mode], pts[mode] = _flat(model), pt
        pt.close()
    torch.testing.assert_close(final[ghost], final["hooks"], rtol=1e-4, atol=1e-5)
    assert pts[ghost].steps == pts["hooks"].steps == len(pts["hooks"].data_loader)
    assert pts[ghost].event() == pts["hooks"].event()
    assert pts[ghost].epsilon(1e-3) == pts["hooks"].epsilon(1e-3)


@pytest.mark.parametrize("ghost", ["ghost", "bookkeeping"])
def test_ghost_refuses_a_gradient_not_clipped_by_its_criterion(ghost):
    ds = _images()
    _, pt = _private_copy(ghost, ds, noise_multiplier=1.0, poisson_sampling=False)
    x, y = next(iter(pt.data_loader))
    pt.optimizer.zero_grad()
    nn.functional.cross_entropy(pt.model(x), y).backward()  # the unclipped mean gradient
    with pytest.raises(PrivacyError, match="PrivateTraining.criterion"):
        pt.optimizer.step()
    assert pt.steps == 0
    pt.close()


@pytest.mark.parametrize("ghost", ["ghost", "bookkeeping"])
def test_ghost_takes_an_empty_poisson_batch_as_a_noise_only_step(ghost):
    ds = _images()
    model, pt = _private_copy(ghost, ds, noise_multiplier=0.0, poisson_sampling=False)
    before = _flat(model)
    pt.optimizer.zero_grad()
    pt.criterion(pt.model(ds.tensors[0][:0]), ds.tensors[1][:0]).backward()
    pt.optimizer.step()
    assert pt.steps == 1 and torch.equal(_flat(model), before)  # no noise, no example: no move
    pt.close()


class _Scale(nn.Module):
    """A layer with its own parameter and no Opacus grad or norm sampler."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


def test_unsupported_layer_falls_back_to_hooks_and_logs_why(caplog):
    model = nn.Sequential(nn.Linear(8, 4), _Scale(4), nn.Linear(4, 2))
    with caplog.at_level(logging.INFO, logger="secagg.dpsgd"):
        pt = make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          data_loader=DataLoader(_data(), batch_size=50), noise_multiplier=1.0,
                          max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
    assert pt.clipping.mode == "hooks" and "1 (_Scale)" in pt.clipping.reason
    assert f"clipping: hooks ({pt.clipping.reason})" in caplog.text
    x, y = next(iter(pt.data_loader))  # and it trains, the loss from its own criterion
    pt.optimizer.zero_grad()
    pt.criterion(pt.model(x), y).backward()
    pt.optimizer.step()
    assert pt.steps == 1
    pt.close()


@pytest.mark.parametrize("criterion, model, why", [
    (None, _model(), "no criterion was given"),
    (lambda out, y: nn.functional.cross_entropy(out, y), _model(), "not a torch loss module"),
    (nn.CrossEntropyLoss(reduction="sum"), _model(), "must be 'mean'"),
    (nn.CrossEntropyLoss(), nn.Sequential(nn.Linear(8, 4), _Scale(4)), "no norm or per-example"),
])
def test_ghost_is_chosen_only_where_it_applies(criterion, model, why):
    from privacy.clipping import choose_clipping

    assert choose_clipping(_model(), nn.CrossEntropyLoss()).mode == "bookkeeping"
    choice = choose_clipping(model, criterion)
    assert choice.mode == "hooks" and why in choice.reason
    for mode in ("ghost", "bookkeeping"):
        with pytest.raises(ConfigError, match=why.replace("(", r"\(")):
            choose_clipping(model, criterion, mode)
    assert choose_clipping(_model(), nn.CrossEntropyLoss(), "hooks").mode == "hooks"
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        choose_clipping(_model(), nn.CrossEntropyLoss(), "functorch")


def test_tied_weights_are_not_ghost_clipped():
    from privacy.clipping import choose_clipping

    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    choice = choose_clipping(nn.Sequential(first, nn.Tanh(), second), nn.CrossEntropyLoss())
    assert choice.mode == "hooks" and "tied weights" in choice.reason


def test_layers_outside_single_pass_clipping_take_opacus_ghost_clipping():
    from privacy.clipping import choose_clipping

    model = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2))  # Opacus samples it
    choice = choose_clipping(model, nn.CrossEntropyLoss())
    assert choice.mode == "ghost" and "1 (LayerNorm) is not a Linear or Conv2d" in choice.reason
    with pytest.raises(ConfigError, match="not a Linear or Conv2d"):
        choose_clipping(model, nn.CrossEntropyLoss(), "bookkeeping")


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.layer(torch.tanh(self.layer(x))))


def test_single_pass_clipping_refuses_a_layer_run_twice():
    model = _Twice()
    pt = make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      data_loader=DataLoader(_data(), batch_size=50), noise_multiplier=1.0,
                      max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
    assert pt.clipping.mode == "bookkeeping"
    x, y = next(iter(pt.data_loader))
    pt.optimizer.zero_grad()
    loss = pt.criterion(pt.model(x), y)
    with pytest.raises(ConfigError, match="exactly once"):
        loss.backward()
    with pytest.raises(PrivacyError):
        pt.optimizer.step()
    pt.close()


def test_single_pass_clipping_refuses_an_output_changed_in_place():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    pt = make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      data_loader=DataLoader(_data(), batch_size=50), noise_multiplier=1.0,
                      max_grad_norm=1.0, criterion=nn.CrossEntropyLoss())
    x, y = next(iter(pt.data_loader))
    pt.optimizer.zero_grad()
    with pytest.raises(ConfigError, match="in place"):
        pt.criterion(pt.model(x), y).backward()
    pt.close()
