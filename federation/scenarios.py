"""The demo scenarios: complete experiment configurations with a story.

=============  ===============================================================================
hospitals      10 hospitals, breast cancer data (bundled with scikit-learn), DP-SGD clients,
               masking secure aggregation, one hospital drops mid-round (after sharing its
               keys, before uploading) and the protocol recovers its masks. ``make demo``.
finance        8 banks, credit-card default data (``finance/`` under ``--data-dir``), label-skewed
               (Dirichlet), DP-SGD clients, CKKS: the server adds ciphertexts and holds no key.
iot            100 small devices (scikit-learn's 8x8 digits stand in for sensor readings), 30 per
               round, sparse SecAgg+ graph, 16-bit update quantization, 10 % random dropouts.
mnist          MNIST over 2 clients, tanh CNN, DP-SGD (clip 0.1, momentum 0.9), masking
               (``mnist/raw`` under ``--data-dir``).
femnist        FEMNIST, one client per writer (natural non-IID), GroupNorm CNN, masking.
shops          8 shops recommend items (synthetic purchases, or MovieLens ratings with
               ``--data-dir``): item embeddings aggregated securely (masking), customer
               embeddings stay in each shop, customer-level DP-SGD; HR@10 / NDCG@10 against a
               central model, each shop alone and popularity.
=============  ===============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from federation.config import ExperimentConfig
from secagg.errors import ConfigError


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    client_noun: str
    options: dict
    story: str
    # options that replace the DP-tuned ones when the scenario runs without DP (e.g. DP-SGD's
    # large learning rate, which diverges without per-example clipping)
    without_dp: dict = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    "hospitals": Scenario(
        "hospitals", "10 hospitals, breast cancer diagnosis", "hospital",
        dict(dataset="breast_cancer", num_clients=10, partition="iid", model="logreg",
             rounds=8, clients_per_round=10, local_epochs=1, batch_size=8, lr=0.1,
             protection="masking", threshold=7, update_clip=10.0,
             dp="dpsgd", noise_multiplier=1.5, max_grad_norm=1.0, delta=1e-5, budget_epsilon=8.0,
             dropout_schedule=[{"round": 3, "stage": "masked_input", "clients": [7]}],
             out_dir="out/demo-hospitals", name="hospitals"),
        "Each hospital trains on its own patients with DP-SGD and uploads only a masked update; "
        "hospital 7 drops in round 3 after sharing its keys, and the others recover its masks.",
    ),
    "finance": Scenario(
        "finance", "8 banks, credit-card default prediction", "bank",
        dict(dataset="finance", num_clients=8, partition="dirichlet", alpha=2.0, model="logreg",
             rounds=8, clients_per_round=8, local_epochs=1, batch_size=64, lr=0.2,
             protection="ckks", update_clip=10.0,
             dp="dpsgd", noise_multiplier=1.2, max_grad_norm=1.0, delta=1e-5, budget_epsilon=5.0,
             out_dir="out/demo-finance", name="finance"),
        "Each bank encrypts its update under CKKS; the server adds ciphertexts without any secret key.",
    ),
    "iot": Scenario(
        "iot", "100 devices, sparse secure aggregation with quantized updates", "device",
        dict(dataset="digits", num_clients=100, partition="iid", model="mlp", hidden=32,
             rounds=10, clients_per_round=30, local_epochs=2, batch_size=8, lr=0.5,
             protection="masking-sparse", bits=16, update_clip=5.0, dropout_rate=0.1,
             out_dir="out/demo-iot", name="iot"),
        "Each device talks to a few neighbours only (SecAgg+), uploads 16-bit masked integers, "
        "and 10 % of devices drop at random stages.",
    ),
    "mnist": Scenario(
        "mnist", "2 clients, MNIST digits with DP-SGD", "client",
        # Carried over from the centralised DP-SGD run (benchmarks/bench_dpsgd_mnist.py): the
        # tanh CNN, clipping 0.1, SGD momentum 0.9, 40 epochs. Two clients of 30,000 digits,
        # each with expected batch 512 (q = 1/58.6, 59 steps a round), so the averaged step
        # sees ~1,024 records; sigma 1.372 is planned (PRV) for epsilon 3 after 40 rounds.
        dict(dataset="mnist", num_clients=2, partition="iid", model="tanh-cnn", rounds=40,
             clients_per_round=2, local_epochs=1, batch_size=512, lr=1.0, momentum=0.9,
             protection="masking", update_clip=20.0,
             dp="dpsgd", noise_multiplier=1.372, max_grad_norm=0.1, delta=1e-5, budget_epsilon=3.0,
             out_dir="out/demo-mnist", name="mnist"),
        "Each client runs DP-SGD on 30,000 digits with a tanh CNN; updates are masked.",
        without_dp={"lr": 0.1},
    ),
    "femnist": Scenario(
        "femnist", "FEMNIST writers as natural clients", "writer",
        dict(dataset="femnist", num_clients=100, partition="natural", model="cnn", rounds=20,
             clients_per_round=20, local_epochs=2, batch_size=16, lr=0.1,
             protection="masking", update_clip=20.0, dropout_rate=0.05,
             out_dir="out/demo-femnist", name="femnist"),
        "Every writer is one client (natural non-IID split); 20 writers per round, masked updates.",
    ),
    "shops": Scenario(
        "shops", "8 shops train a recommender without pooling their customers", "shop",
        # Matrix factorisation: the item table (1,000 items x 16 factors + biases) is the shared
        # model; each shop's customer embeddings never leave it. dp = "dpsgd" here is
        # customer-level DP-SGD (a customer and all their purchases is the unit).
        dict(dataset="shops", num_clients=8, partition="natural", model="mf", hidden=16, rounds=20,
             clients_per_round=8, local_epochs=1, batch_size=50, lr=1.0, server_lr=4.0,
             protection="masking", threshold=6, update_clip=100.0,
             dp="dpsgd", noise_multiplier=1.5, max_grad_norm=0.3, delta=1e-5, budget_epsilon=10.0,
             eval_every=5, out_dir="out/demo-shops", name="shops"),
        "Each shop trains item and customer embeddings on its own customers with customer-level "
        "DP-SGD and uploads only its masked item-table update; customer embeddings never leave the shop.",
    ),
}


# The shops scenario's options changed for each preset of the synthetic generator
# (federation.recsys.synthetic.PRESETS): "many-customers" shares a 300 x 8 table among 16 shops and
# trains 10 rounds of 4 local epochs (fewer rounds: fewer compositions), customer-level DP-SGD at sigma 2;
# "small-shops" shares a 300 x 8 table among 50 shops of 200 customers, 40 rounds of 2 local epochs of
# batch 100 (half a shop: less noise per step and fewer steps to account), learning rate 4, sigma 4,
# clip 0.5 (a customer's gradient norm is about 0.5 with five training purchases). Twice the rounds of
# sigma 3 at about the same epsilon (7.7 against 7.4 by the ledger): the item table needs the steps more
# than it needs the lower noise (docs/recommendation.md has both).
SHOPS_PRESET_OPTIONS: dict[str, dict] = {
    "default": {},
    "many-customers": {"num_clients": 16, "clients_per_round": 16, "threshold": 12, "hidden": 8, "batch_size": 100,
                       "lr": 4.0, "server_lr": 2.0, "local_epochs": 4, "rounds": 10, "noise_multiplier": 2.0,
                       "max_grad_norm": 0.3, "eval_every": 10},
    "small-shops": {"num_clients": 50, "clients_per_round": 50, "threshold": 38, "hidden": 8, "batch_size": 100,
                    "lr": 4.0, "server_lr": 2.0, "local_epochs": 2, "rounds": 40, "noise_multiplier": 4.0,
                    "max_grad_norm": 0.5, "eval_every": 40},
}


def shops_preset_config(preset: str, *, dp: bool = True) -> ExperimentConfig:
    """The shops scenario's config for a generator preset (see :data:`SHOPS_PRESET_OPTIONS`)."""
    if preset not in SHOPS_PRESET_OPTIONS:
        raise ConfigError(f"unknown shops preset {preset!r}; choose one of {', '.join(SHOPS_PRESET_OPTIONS)}")
    cfg = scenario_config("shops", dp=dp)
    for key, value in SHOPS_PRESET_OPTIONS[preset].items():
        if key != "noise_multiplier" or dp:
            cfg.set(key, value)
    return cfg


def scenario_config(name: str, *, dp: bool = True) -> ExperimentConfig:
    """A fresh config for scenario ``name``; ``dp=False`` turns DP off with the non-DP settings."""
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    scenario = SCENARIOS[name]
    options = dict(scenario.options)
    if not dp:
        options.update(dp="none", budget_epsilon=None, **scenario.without_dp)
    return ExperimentConfig.from_dict(options)
