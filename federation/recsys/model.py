"""Matrix factorisation for implicit feedback, split into a shared and a private part.

A customer u of shop s scores item i as ``p_u . q_i + b_i``. The *item table* (``Q``: items x dim
and the biases ``b``) is the shared part: shops train it together and only its update is
aggregated (securely). The *customer embeddings* ``p_u`` are the private part: each shop keeps
its own customers' rows and never sends them anywhere.

Loss (a softmax over the shop's catalogue, the "multinomial likelihood" of Liang et al. 2018):
for customer u with training items I_u,

    loss_u = -(1 / |I_u|) * sum_{i in I_u} log softmax_{j in catalogue(s)}(p_u . q_j + b_j)_i

so the gradient with respect to the logits is ``g_u = softmax - y_u / |I_u|`` (zero outside the
catalogue: a shop never pushes down items it does not sell), and customer u's gradient on the
item table is ``g_u (x) p_u`` for Q and ``g_u`` for b, of L2 norm ``||g_u|| * sqrt(||p_u||^2 + 1)``.
That closed form makes per-customer clipping exact and vectorized: **customer-level DP-SGD**
(Abadi et al. 2016 with the customer as the unit) clips each customer's whole item-table gradient
to ``max_grad_norm``, samples customers by Poisson sampling at rate batch_size / customers, and adds
Gaussian noise of std ``noise_multiplier * max_grad_norm`` to every catalogue row of the summed
gradient. Rows outside the catalogue get no gradient from any customer of this shop (the
catalogue is public), so they are neither changed nor noised.

Customer embeddings take a plain SGD step from the customer's own gradient ``Q^T g_u`` when the
customer is in the batch. They depend only on that customer's data and the (noised) item table,
and are never released: the guarantee is joint DP for the released item tables (Kearns et al.
2014; Jain et al. 2021, "Differentially private model personalization"). Recommending to u with
u's own embedding is the intended use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from federation.recsys.interactions import Interactions
from privacy.distributed import os_uniform
from secagg.errors import ConfigError

INIT_STD = 0.1  # initial std of item factors and customer embeddings


class ItemTable(nn.Module):
    """The shared part as a torch module (item factors, then item biases), so that the round
    engine can build, flatten and checkpoint it like any other model. It has no forward pass: the
    shops train it in numpy (:func:`train_customers`)."""

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        self.factors = nn.Parameter(torch.randn(num_items, dim) * INIT_STD)
        self.bias = nn.Parameter(torch.zeros(num_items))


@dataclass(frozen=True)
class TableShape:
    """How a flat parameter vector splits into the item factors and the biases."""

    num_items: int
    dim: int

    @property
    def size(self) -> int:
        return self.num_items * (self.dim + 1)

    def split(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if flat.shape != (self.size,):
            raise ConfigError(f"item table: expected {self.size} parameters, got {flat.shape}")
        cut = self.num_items * self.dim
        return (flat[:cut].reshape(self.num_items, self.dim).astype(np.float64),
                flat[cut:].astype(np.float64))

    def join(self, factors: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return np.concatenate([factors.ravel(), bias]).astype(np.float32)


@dataclass(frozen=True)
class LocalSteps:
    """How a shop trains in one round. ``noise_multiplier`` None: no DP (plain minibatches)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1.0
    user_lr: float = 1.0
    l2: float = 1e-3
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0

    def steps(self, customers: int) -> int:
        return self.epochs * -(-customers // self.batch_size)


def gaussian(size: int | tuple[int, ...], rng: np.random.Generator | None = None) -> np.ndarray:
    """Standard normal draws from ``os.urandom`` unless ``rng`` is given (``deterministic = true``
    only: noise derived from a public seed gives no privacy).

    Each draw is the sum of four Box-Muller normals, halved -- still N(0, 1) -- the defence of
    Holohan & Braghin 2021 (Opacus' secure mode, as in :func:`privacy.dpsgd.secure_noise`)
    against the floating-point attacks of Mironov 2012 on the low bits of a single draw.
    """
    if rng is not None:
        return rng.standard_normal(size)
    n = int(np.prod(size))
    half = 2 * n  # four normals per output, two per Box-Muller pair
    radius = np.sqrt(-2.0 * np.log(os_uniform(half)))
    angle = 2 * np.pi * os_uniform(half)
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    return (normals.reshape(4, n).sum(axis=0) / 2.0).reshape(size)


def logit_gradients(
    users: np.ndarray, factors: np.ndarray, bias: np.ndarray, targets: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(g, loss): per-customer gradient w.r.t. the logits and per-customer loss (see module)."""
    logits = users @ factors.T + bias
    logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    total = exp.sum(axis=1, keepdims=True)
    prob = exp / total
    counts = targets.sum(axis=1, keepdims=True)
    grad = prob - targets / counts
    log_prob = np.where(targets > 0, logits - np.log(total), 0.0)
    loss = -(log_prob.sum(axis=1) / counts[:, 0])
    return grad, loss


def train_customers(
    factors: np.ndarray,
    bias: np.ndarray,
    users: np.ndarray,
    customers: np.ndarray,
    data: Interactions,
    steps: LocalSteps,
    *,
    rng: np.random.Generator,
    noise_rng: np.random.Generator | None = None,
) -> tuple[float, int]:
    """Train in place: ``factors``, ``bias`` and the rows of ``users`` (one per entry of
    ``customers``, in that order). Returns (mean training loss, optimizer steps).

    Each customer's softmax runs over their own shop's catalogue, so the same function trains one
    shop, or all customers pooled (the central baseline). With ``steps.noise_multiplier`` set it
    runs customer-level DP-SGD: Poisson sampling at q = batch_size / len(customers), exactly
    ``steps.steps(len(customers))`` steps, per-customer clipping, Gaussian noise (``noise_rng``
    None: from the operating system).
    """
    n = len(customers)
    dp = steps.noise_multiplier is not None
    q = min(1.0, steps.batch_size / n)
    shop_masks = data.catalogues[data.shop_of[customers]] if not dp else None
    noise_rows = np.flatnonzero(data.catalogues[np.unique(data.shop_of[customers])].any(axis=0))
    loss_sum, loss_count, taken = 0.0, 0, 0
    for batch in _batches(n, steps, q, dp, rng):
        taken += 1
        sum_q = np.zeros_like(factors)
        sum_b = np.zeros_like(bias)
        if len(batch):
            ids = customers[batch]
            mask = shop_masks[batch] if shop_masks is not None else data.catalogues[data.shop_of[ids]]
            p = users[batch]
            g, loss = logit_gradients(p, factors, bias, data.train_matrix(ids), mask)
            loss_sum += float(loss.sum())
            loss_count += len(batch)
            weight = np.ones(len(batch))
            if dp:
                norms = np.linalg.norm(g, axis=1) * np.sqrt((p * p).sum(axis=1) + 1.0)
                weight = np.minimum(1.0, steps.max_grad_norm / np.maximum(norms, 1e-12))
            sum_q = (g * weight[:, None]).T @ p
            sum_b = weight @ g
            users[batch] = p - steps.user_lr * (g @ factors + steps.l2 * p)
        if dp:
            std = steps.noise_multiplier * steps.max_grad_norm
            sum_q[noise_rows] += std * gaussian((len(noise_rows), factors.shape[1]), noise_rng)
            sum_b[noise_rows] += std * gaussian(len(noise_rows), noise_rng)
            denominator = q * n  # expected batch size: the noise scale must not depend on the batch
        else:
            denominator = max(len(batch), 1)
        factors -= steps.lr * sum_q / denominator
        bias -= steps.lr * sum_b / denominator
    return loss_sum / max(loss_count, 1), taken


def _batches(n: int, steps: LocalSteps, q: float, dp: bool, rng: np.random.Generator):
    if dp:  # Poisson sampling, the number of steps the accountant charges
        for _ in range(steps.steps(n)):
            yield np.flatnonzero(rng.random(n) < q)
        return
    for _ in range(steps.epochs):
        order = rng.permutation(n)
        for start in range(0, n, steps.batch_size):
            yield order[start:start + steps.batch_size]


def init_users(count: int, dim: int, seed: int) -> np.ndarray:
    """Initial customer embeddings (public randomness: they carry no data yet)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0xC057])).normal(0.0, INIT_STD, (count, dim))

