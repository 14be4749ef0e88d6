"""The recommender's model: the closed-form per-customer gradient that customer-level DP-SGD
clips, noise only where a customer can change the table, customer embeddings kept local."""

from __future__ import annotations

import numpy as np
import torch

from federation.recsys.model import LocalSteps, logit_gradients, train_customers
from federation.recsys.synthetic import SyntheticShops, generate_shops

SMALL = SyntheticShops(num_shops=3, customers_per_shop=40, min_customers=30, num_items=80)


def test_closed_form_customer_gradient_matches_autograd_and_its_norm():
    data = generate_shops(SMALL, seed=1)
    rng = np.random.default_rng(0)
    customers = data.customers_of(1)[:5]
    factors, bias = rng.normal(0, 0.3, (data.num_items, 6)), rng.normal(0, 0.1, data.num_items)
    users = rng.normal(0, 0.3, (5, 6))
    targets = data.train_matrix(customers)
    mask = data.catalogues[data.shop_of[customers]]
    g, loss = logit_gradients(users, factors, bias, targets, mask)
    for row in range(5):
        q = torch.tensor(factors, requires_grad=True)
        b = torch.tensor(bias, requires_grad=True)
        logits = torch.tensor(users[row]) @ q.T + b
        logits = logits.masked_fill(~torch.tensor(mask[row]), float("-inf"))
        y = torch.tensor(targets[row], dtype=torch.float64)
        log_p = torch.log_softmax(logits, 0)
        ref = -(torch.where(y > 0, log_p, torch.zeros_like(log_p)).sum() / y.sum())
        ref.backward()
        assert np.isclose(loss[row], float(ref.detach()))
        assert np.allclose(np.outer(g[row], users[row]), q.grad.numpy(), atol=1e-12)
        assert np.allclose(g[row], b.grad.numpy(), atol=1e-12)
        full_norm = np.sqrt((q.grad.numpy() ** 2).sum() + (b.grad.numpy() ** 2).sum())
        closed = np.linalg.norm(g[row]) * np.sqrt(users[row] @ users[row] + 1.0)
        assert np.isclose(full_norm, closed)  # what DP-SGD clips is the exact per-customer norm
        assert np.all(g[row][~mask[row]] == 0)  # nothing outside the shop's catalogue


def test_dp_step_clips_each_customer_and_noises_only_the_catalogue_rows():
    data = generate_shops(SMALL, seed=2)
    shop = 0
    customers = data.customers_of(shop)
    rng = np.random.default_rng(5)
    factors, bias = rng.normal(0, 0.1, (data.num_items, 4)), np.zeros(data.num_items)
    before_f, before_b = factors.copy(), bias.copy()
    users = rng.normal(0, 0.1, (len(customers), 4))
    steps = LocalSteps(epochs=1, batch_size=8, lr=0.5, noise_multiplier=1.0, max_grad_norm=0.5)
    _, taken = train_customers(factors, bias, users, customers, data, steps,
                               rng=np.random.default_rng(1), noise_rng=np.random.default_rng(2))
    assert taken == steps.steps(len(customers))  # exactly what the accountant charges
    outside = ~data.catalogues[shop]
    assert outside.any()
    assert np.array_equal(factors[outside], before_f[outside]) and np.array_equal(bias[outside], before_b[outside])
    inside = data.catalogues[shop]
    assert np.all(factors[inside] != before_f[inside])  # noised (and trained) everywhere inside


def test_noise_is_drawn_from_the_os_unless_a_generator_is_given():
    data = generate_shops(SMALL, seed=2)
    customers = data.customers_of(0)
    results = []
    for _ in range(2):
        factors, bias = np.zeros((data.num_items, 4)), np.zeros(data.num_items)
        users = np.full((len(customers), 4), 0.1)
        steps = LocalSteps(epochs=1, batch_size=8, noise_multiplier=1.0)
        train_customers(factors, bias, users, customers, data, steps, rng=np.random.default_rng(1))
        results.append(factors)
    assert not np.array_equal(*results)  # same seed for the batches, fresh noise each time


def test_a_baseline_checkpoint_is_the_same_run_as_training_that_many_epochs():
    """train_mf ranks along one trajectory; the point after k epochs must be the model trained for
    k epochs in one go (same batches, same steps), so "best epochs" is a real training run."""
    from federation.recsys.baselines import epoch_grid, train_mf, tune_mf
    from federation.recsys.federation import L2
    from federation.recsys.metrics import mf_scorer, rank_customers
    from federation.recsys.model import INIT_STD, init_users

    data = generate_shops(SMALL, seed=4)
    customers = data.customers_of(2)
    along = train_mf(data, customers, dim=4, checkpoints=(1, 3), batch_size=8, lr=2.0, l2=L2, seed=7)
    rng = np.random.default_rng(np.random.SeedSequence([7, 0xBA5E]))
    factors, bias = rng.normal(0.0, INIT_STD, (data.num_items, 4)), np.zeros(data.num_items)
    users = init_users(len(customers), 4, 7)
    train_customers(factors, bias, users, customers, data, LocalSteps(epochs=3, batch_size=8, lr=2.0, user_lr=2.0,
                                                                      l2=L2), rng=rng)
    assert along[3] == rank_customers(mf_scorer(users, factors, bias), customers, data)
    assert epoch_grid(10) == (1, 2, 4, 8, 10, 16, 20) and epoch_grid(1) == (1, 2)
    best = tune_mf(data, customers, dim=4, epochs=2, batch_size=8, l2=L2, seed=7, lrs=(1.0, 2.0))
    every = [r for lr in (1.0, 2.0) for r in train_mf(data, customers, dim=4, checkpoints=epoch_grid(2), batch_size=8,
                                                       lr=lr, l2=L2, seed=7).values()]
    assert best.ranking.hits == max(r.hits for r in every) and best.lr in (1.0, 2.0) and best.epochs in (1, 2, 4)
