"""The federation engine: rounds of sample -> train -> protect/aggregate -> update -> account.

:meth:`Federation.run_round` is the round of every backend; a :class:`RoundExecutor` (who
trains) and a :class:`RoundAggregator` (how the protected sum is computed and released) plug
in. In process (and on Ray), step by step:

1. :meth:`Federation.sample_clients` -- a fixed count, or Poisson sampling at rate q;
2. :meth:`Federation.plan_faults` -- which sampled clients drop, and at which protocol stage
   (random ``dropout_rate``, ``straggler_rate`` -- a straggler misses the upload deadline -- and
   an explicit ``dropout_schedule``);
3. :meth:`Federation.reserve_budget` -- write-ahead ledger row with the round's spend;
   raises :class:`PrivacyBudgetExceeded` before anyone trains;
4. :meth:`Federation.train_clients` -- local training through a :class:`ClientExecutor`
   (in process by default; a Ray backend runs :class:`TrainTask` elsewhere);
5. :meth:`Federation.encode_updates` -- clip, weight, (distributed) noise: the vectors clients
   hand to the protocol;
6. :meth:`Federation.aggregate` -- the :class:`~federation.aggregators.Aggregator` runs the
   real protocol over all sampled clients and their dropouts; the server learns only the sum;
7. ledger commit, then central noise for user-level DP (the release);
8. :meth:`Federation.apply_aggregate` -- decode the mean update, the strategy's server step;
9. evaluation, checkpoint. Over gRPC (:mod:`federation.transport.training`) clients train on
   their hosts and aggregate in the server's round; steps 3, 7, 8 and 9 are the same code.

Randomness: which clients take part in a round is drawn from the operating system
(``os.urandom``) at round time -- the ledger's amplification by sampling holds only if the
sample is unpredictable -- and only counts of sampled clients reach shared files when a
sampling rate q < 1 is claimed. Simulated faults and batch order are public and derived from
``(seed, round)``. DP noise and the protocol's keys and masks come from the operating system
unless ``deterministic = true`` (insecure, for tests and benchmarks: it derives all of them
from the seed, warns, and the ledger and report say so).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from federation import checkpoint as ckpt_io
from federation.accounting import DistributedNoisePlan, RoundAccountant
from federation.aggregators import (
    PRE_UPLOAD_STAGES,
    STAGES,
    Aggregator,
    make_aggregator,
    protocol_available,
)
from federation.config import CUSTOM_PREFIX, ExperimentConfig
from federation.custom import EvaluateHook, TrainHook, build_config, check_metrics, custom_setup
from federation.data import Dataset, check_available, load_dataset, partition
from federation.models import build_model, get_flat, num_params, set_flat
from federation.outputs import write_metrics_csv, write_model
from federation.strategies import Strategy
from federation.training import ClientUpdate, LocalTraining, evaluate, train_client
from privacy.dpfedavg import add_gaussian_noise, fixed_sample, poisson_sample
from privacy.ledger import DETERMINISTIC_NOTE, Ledger, LedgerEntry, Spend
from privacy.ledger_key import load_or_create_key, read_key
from secagg.errors import ConfigError, NotEnoughSurvivors, PrivacyBudgetExceeded
from secagg.rounds import RoundOutcome

LEDGER_FILE = "ledger.db"
LEDGER_KEY_FILE = "ledger.key"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "privacy_report.html"

# dp_accounting logs a warning per RDP order it drops; that is expected for small sampling rates.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True)
class TrainTask:
    """Everything one client needs to train in one round (plain values, picklable)."""

    client: int
    round: int
    global_params: np.ndarray
    x: np.ndarray
    y: np.ndarray
    config: LocalTraining
    build: Callable[[], torch.nn.Module]
    seed: int | None


class ClientExecutor(Protocol):
    """Runs the local-training step of a round; returns updates in task order."""

    def run(self, tasks: Sequence[TrainTask]) -> list[ClientUpdate]: ...


class SequentialExecutor:
    """Trains clients one after another in this process (the default)."""

    def run(self, tasks: Sequence[TrainTask]) -> list[ClientUpdate]:
        return [run_task(t) for t in tasks]


def run_task(task: TrainTask) -> ClientUpdate:
    """Execute one :class:`TrainTask` (what a remote worker calls)."""
    return train_client(task.build, task.global_params, task.x, task.y, task.config,
                        client=task.client, seed=task.seed)


@dataclass(frozen=True)
class Cohort:
    """Who a round asks to take part, decided before the budget is reserved."""

    clients: list[int]  # client ids in row order (empty: whoever is connected when the round starts)
    faults: dict[str, list[int]]  # simulated dropouts: stage -> rows
    reserve: int  # participants the ledger's reservation records


@dataclass(frozen=True)
class Trained:
    """What the training step hands the aggregation step."""

    vectors: np.ndarray | None = None  # in process: the rows the clients protect
    clip: float | None = None  # the L2 bound every row satisfies
    train_loss: float | None = None
    broadcast: bytes | None = None  # clients on their own hosts: the model message they train from


@dataclass(frozen=True)
class Aggregated:
    """What the aggregation step did, in client ids (not rows)."""

    clients: list[int]  # who took part
    dropped: dict[str, list[int]]  # stage -> clients that stopped there
    outcome: RoundOutcome | None = None  # ``total`` as released (central noise included)
    aborted: str | None = None  # why nothing was released (``outcome`` is then None)


Release = Callable[[RoundOutcome], np.ndarray]  # ledger commit; returns the total as it may leave


class RoundExecutor(Protocol):
    """Who trains (:class:`LocalClients`; :class:`federation.transport.training.HostClients`)."""

    def cohort(self, fed: Federation, rnd: int) -> Cohort: ...

    def train(self, fed: Federation, rnd: int, cohort: Cohort) -> Trained: ...


class RoundAggregator(Protocol):
    """How the protected sum is computed and released (:class:`LocalAggregation`;
    :class:`federation.transport.training.GrpcAggregation`); calls ``release`` before the sum
    is used or sent anywhere."""

    def aggregate(self, fed: Federation, rnd: int, cohort: Cohort, trained: Trained,
                  release: Release) -> Aggregated: ...


class LocalClients:
    """Sampled clients train through the federation's :class:`ClientExecutor` (here, or Ray tasks)."""

    def cohort(self, fed: Federation, rnd: int) -> Cohort:
        sampled = fed.sample_clients(rnd)
        return Cohort(sampled, fed.plan_faults(rnd, sampled), len(sampled))

    def train(self, fed: Federation, rnd: int, cohort: Cohort) -> Trained:
        updates = fed.train_clients(rnd, cohort.clients, cohort.faults)
        vectors, clip = fed.encode_updates(updates)
        losses = [u.loss for u in updates if u is not None and not math.isnan(u.loss)]
        return Trained(vectors, clip, float(np.mean(losses)) if losses else None)


class LocalAggregation:
    """The protocol runs over the trained rows through the federation's
    :class:`~federation.aggregators.Aggregator` (here, or on Ray actors)."""

    def aggregate(self, fed: Federation, rnd: int, cohort: Cohort, trained: Trained,
                  release: Release) -> Aggregated:
        sampled, faults = cohort.clients, cohort.faults
        dropped = {s: [sampled[i] for i in rows] for s, rows in faults.items()}
        minimum = 1 if fed.config.protection == "none" else max(2, fed.config.threshold or 2)
        uploading = len(sampled) - sum(len(faults.get(s, ())) for s in PRE_UPLOAD_STAGES)
        if len(sampled) < minimum or uploading < 1:
            return Aggregated(sampled, dropped, aborted=f"{len(sampled)} client(s) sampled, {uploading} "
                                                        "uploading: too few for the protocol")
        try:
            result = fed.aggregate(trained.vectors, faults, trained.clip)
        except NotEnoughSurvivors as exc:
            return Aggregated(sampled, dropped, aborted=f"protocol aborted: {exc}")
        total = release(result)
        return Aggregated(sampled, dropped, replace(result, total=total,
                                                    included=tuple(sampled[i] for i in result.included)))


@dataclass(frozen=True)
class RoundResult:
    """What one round did and what it cost. ``included`` are client ids whose update counted."""

    round: int
    accuracy: float | None
    loss: float | None
    epsilon: float
    bytes_up_per_param: float
    bytes_up_total: int
    sampled: list[int]
    included: list[int]
    dropped: dict[str, list[int]]
    train_loss: float | None
    max_quantization_error: float
    seconds: float
    aborted: str | None = None
    sampled_count: int | None = None
    included_count: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the caller's evaluate(model) hook

    def to_json(self, *, redact: bool = False) -> dict:
        """The round as JSON; ``redact`` keeps counts and drops who was sampled, included or
        dropped (needed when the ledger claims amplification by client sampling)."""
        data = asdict(self)
        if redact:
            data.update(sampled=[], included=[], dropped={}, sampled_count=len(self.sampled),
                        included_count=len(self.included))
        return data


@dataclass
class RunSummary:
    config: ExperimentConfig
    rounds: list[RoundResult] = field(default_factory=list)
    out_dir: Path | None = None
    num_params: int = 0
    resumed_from: int = 0

    @property
    def final(self) -> RoundResult | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def final_accuracy(self) -> float | None:
        accs = [r.accuracy for r in self.rounds if r.accuracy is not None]
        return accs[-1] if accs else None


class Federation:
    """A federated experiment run in this process: a built-in scenario from an
    :class:`ExperimentConfig`, or the caller's own model and per-site data.

    Own model and data (every option of :class:`ExperimentConfig` is a keyword)::

        fed = Federation(model=make_model, client_data=[(x1, y1), (x2, y2), (x3, y3)],
                         loss=torch.nn.CrossEntropyLoss(), test_data=(x_test, y_test),
                         protection="masking", dp="dpsgd", budget_epsilon=8.0, rounds=5)
        summary = fed.run()

    ``model`` is an ``nn.Module`` or a function returning a fresh one; ``client_data`` holds one
    ``(x, y)`` pair (or torch Dataset) per site, and each site trains only on its own records;
    ``loss(output, y)`` is the mean loss of a batch (default: cross-entropy); ``train(model,
    loader)`` replaces the engine's local SGD (not with DP-SGD: see LocalTraining);
    ``evaluate(model) -> {name: value}`` adds metrics of the global model to every evaluated
    round. Everything that can be wrong (options, data, model, protocol availability, privacy
    budget) is checked here, before any client trains.
    """

    #: Whether this backend draws each round's clients as configured (``sample_clients``). A
    #: backend whose participants are whoever is connected sets False: the ledger then records
    #: q = 1 (no amplification by sampling is claimed).
    samples_clients: bool = True

    def __init__(
        self,
        config: ExperimentConfig | None = None,
        *,
        model: nn.Module | Callable[[], nn.Module] | None = None,
        client_data: Sequence[object] | None = None,
        test_data: object = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        train: TrainHook | None = None,
        evaluate: EvaluateHook | None = None,
        executor: ClientExecutor | None = None,
        aggregator: Aggregator | None = None,
        dataset: Dataset | None = None,
        **options: object,
    ) -> None:
        custom = None
        if model is not None or client_data is not None:
            if dataset is not None:
                raise ConfigError("pass either client_data= (per-site data) or dataset=, not both")
            custom = custom_setup(model, client_data, test_data)
        elif test_data is not None:
            raise ConfigError("test_data= goes with model= and client_data=; a built-in dataset has its own test split")
        config = build_config(config, options, custom, dataset)
        config.validate(strict=True)
        if aggregator is None:
            missing = protocol_available(config.protection)
            if missing:
                raise ConfigError(missing + "; use protection = 'none' until it is installed")
        if dataset is None and custom is None:
            for key in ("dataset", "model"):
                if str(getattr(config, key)).startswith(CUSTOM_PREFIX):
                    raise ConfigError(
                        f"{key} = {getattr(config, key)!r} records data or a model passed from Python; run the "
                        "script that passed model= and client_data= again, or name a built-in one")
            check_available(config.dataset, config.data_dir)
        if config.deterministic:
            warnings.warn("deterministic = true: DP noise and protocol keys are derived from the seed; "
                          "this is for tests and benchmarks only and gives no privacy", stacklevel=2)
        self.config = config
        self.evaluate_hook = evaluate
        if custom is not None:
            self.dataset, self.parts, self.build = custom.dataset, custom.parts, custom.build
        else:
            self.dataset, self.parts, self.build = builtin_setup(config, dataset)
        self.sizes = [len(p) for p in self.parts]
        self.local = local_training(config, loss=loss, train=train)
        with torch.random.fork_rng():  # the initial model comes from the public seed; global RNG untouched
            torch.manual_seed(config.seed)
            self._model = self.build()
        self.params = get_flat(self._model)
        self.noise_plan: DistributedNoisePlan | None = None
        if config.dp == "user-distributed":
            self.noise_plan = DistributedNoisePlan(
                clip=config.update_clip, clients=config.clients_per_round, threshold=config.threshold,
                bits=config.bits, noise_multiplier=config.noise_multiplier, dim=len(self.params),
                sample_rate=1.0,  # fixed cohorts: no amplification by sampling is claimed
                rng_seed=config.seed if config.deterministic else None)
        self.accountant = RoundAccountant(
            dp=config.dp, delta=config.delta, noise_multiplier=config.noise_multiplier,
            client_sizes=self.sizes, batch_size=config.batch_size, epochs=config.local_epochs,
            client_sample_rate=(config.sampling_rate
                                if config.sampling == "poisson" and self.samples_clients else 1.0),
            clip=config.max_grad_norm if config.dp == "dpsgd" else config.update_clip,
            accountant=enforcing_accountant(config),
            distributed_event=None if self.noise_plan is None else self.noise_plan.event,
            dim=len(self.params),
        )
        self.executor = executor or SequentialExecutor()
        # the round's two seams; a backend whose clients train elsewhere sets its own pair
        self.round_executor: RoundExecutor = LocalClients()
        self.round_aggregator: RoundAggregator = LocalAggregation()
        self.aggregator = aggregator or make_aggregator(
            config.protection, threshold=config.threshold, bits=config.bits,
            seed=config.seed if config.deterministic else None)
        self.strategy = Strategy(config.strategy, server_lr=config.effective_server_lr,
                                 proximal_mu=config.proximal_mu, beta1=config.beta1,
                                 beta2=config.beta2, tau=config.tau)
        self.out_dir = Path(config.out_dir)
        # Central noise comes from os.urandom (rng None); deterministic test runs derive it from the seed.
        self._noise_rng = (np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EC]))
                           if config.deterministic else None)
        self.check_budget()

    # ----------------------------------------------------------------- budget
    def check_budget(self) -> None:
        """Refuse a plan whose rounds do not fit the budget, before anything runs."""
        c = self.config
        if c.budget_epsilon is None or not self.accountant.is_private:
            return
        total = self.accountant.epsilon_after(c.rounds)
        if total > c.budget_epsilon:
            fit = self.accountant.rounds_within(c.budget_epsilon, c.rounds)
            raise PrivacyBudgetExceeded(
                f"{c.rounds} rounds would spend epsilon={total:.3g} (delta={c.delta:g}) but the budget "
                f"is {c.budget_epsilon:g}; only {fit} round(s) fit. Lower rounds, raise "
                "noise_multiplier, or raise budget_epsilon"
            )

    def ledger_key_path(self) -> Path:
        """Where the ledger's HMAC key lives: ``ledger_key`` in the config, else out_dir/ledger.key."""
        return Path(self.config.ledger_key) if self.config.ledger_key else self.out_dir / LEDGER_KEY_FILE

    def ledger_key(self) -> bytes:
        """The ledger's HMAC key; created (mode 0600) with a new ledger, required for an existing one."""
        if (self.out_dir / LEDGER_FILE).exists():
            return read_key(self.ledger_key_path())
        return load_or_create_key(self.ledger_key_path())

    def open_ledger(self) -> Ledger | None:
        """The run's keyed privacy ledger (created on first use), or None without DP."""
        if not self.accountant.is_private:
            return None
        return Ledger(self.out_dir / LEDGER_FILE, budget_epsilon=self.config.budget_epsilon,
                      delta=self.config.delta, accountant=enforcing_accountant(self.config),
                      key=self.ledger_key())

    @property
    def spend_note(self) -> str:
        """The note every reservation carries; says loudly when the noise is not private."""
        note = (f"{self.config.name}: {self.config.dp}, {self.config.protection}; "
                f"config {self.config.fingerprint()}, {code_version()}")
        if self.config.deterministic:
            note = f"{DETERMINISTIC_NOTE} {note}"
        return note

    def report_context(self, rounds: int) -> dict:
        """What the privacy report needs beyond the ledger: run identity, n, batch, per-site budgets."""
        from privacy.accountant import epsilon_of_events
        from privacy.events import dpsgd_event

        c = self.config
        ctx: dict = {"config_hash": c.fingerprint(), "code_version": code_version(),
                     "batch_size": c.batch_size, "ledger_key": str(self.ledger_key_path())}
        if c.dp == "dpsgd":
            ctx["n"] = max(self.sizes)
            acc, sites, cache = enforcing_accountant(c), [], {}
            for k, n_k in enumerate(self.sizes[:MAX_REPORTED_SITES]):
                q, steps = self.local.sample_rate(n_k), self.local.steps(n_k)
                if (q, steps) not in cache:  # each site as if it took part in every round (a bound)
                    ev = dpsgd_event(noise_multiplier=c.noise_multiplier, sample_rate=q, steps=steps)
                    cache[q, steps] = epsilon_of_events([ev] * max(rounds, 0), delta=c.delta, accountant=acc)
                sites.append({"site": k, "records": n_k, "sample_rate": q, "steps_per_round": steps,
                              "epsilon": cache[q, steps]})
            ctx["sites"] = sites
        elif c.dp in ("user", "user-distributed"):
            ctx["n"] = c.num_clients
        return ctx

    def reserve_budget(self, ledger: Ledger | None, rnd: int, participants: int) -> tuple[LedgerEntry | None, float]:
        """Write-ahead: record the round's spend before any client trains.

        A reservation covers exactly one release. One still open from a crashed run is closed
        as aborted (its spend still counts: the crash may have come after the release) and the
        re-run gets a new reservation, so every aggregate that may have left is accounted.
        """
        if ledger is None:
            return None, 0.0
        for stale in (e for e in ledger.rows() if e.status == "reserved"):
            ledger.abort(stale, note="left open by an interrupted run; counted (it may have been released)")
        entry = ledger.reserve(Spend(self.accountant.round_event(), round=rnd,
                                     participants=participants or None, note=self.spend_note))
        return entry, float(entry.epsilon[ledger.accountant])

    @staticmethod
    def commit_release(ledger: Ledger | None, entry: LedgerEntry | None, participants: int) -> None:
        """Record the release in the ledger; called before the aggregate is used or sent anywhere."""
        if ledger is not None and entry is not None:
            ledger.commit(entry, participants=participants or None)

    @staticmethod
    def close_reservation(ledger: Ledger | None, entry: LedgerEntry | None, result: RoundResult) -> None:
        """Abort the reservation of a round that released nothing (a release is committed before use)."""
        if ledger is None or entry is None or not result.aborted:
            return
        if next((e.status for e in ledger.rows() if e.seq == entry.seq), None) == "reserved":
            ledger.abort(entry, note=result.aborted)

    # ----------------------------------------------------------------- steps
    def _round_rng(self, rnd: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.config.seed, rnd, stream]))

    @property
    def redact_cohorts(self) -> bool:
        """True when the ledger claims amplification by client sampling (q < 1): who was
        sampled must then stay secret, so shared files carry counts only."""
        return self.accountant.claims_sampling

    def round_json(self, result: RoundResult) -> dict:
        """A round as it may be written to shared files (metrics, checkpoint, console)."""
        return result.to_json(redact=self.redact_cohorts)

    def sample_clients(self, rnd: int) -> list[int]:
        """The round's clients, drawn from ``os.urandom`` now (never from the public seed).

        ``deterministic = true`` (tests only) derives them from ``(seed, round)`` instead.
        """
        c = self.config
        if c.deterministic:
            rng = self._round_rng(rnd, 1)
            if c.sampling == "poisson":
                return [int(i) for i in np.flatnonzero(rng.random(c.num_clients) < c.sampling_rate)]
            return sorted(int(i) for i in rng.choice(c.num_clients, c.clients_per_round, replace=False))
        if c.sampling == "poisson":
            return poisson_sample(c.num_clients, c.sampling_rate)
        return fixed_sample(c.num_clients, c.clients_per_round)

    def plan_faults(self, rnd: int, sampled: Sequence[int]) -> dict[str, list[int]]:
        """Stage -> row indices (positions in ``sampled``) of the clients dropping there."""
        c, rng = self.config, self._round_rng(rnd, 2)
        stage_of: dict[int, str] = {}
        for row in range(len(sampled)):
            u, stage_pick = rng.random(), int(rng.integers(len(STAGES)))
            if u < c.dropout_rate:
                stage_of[row] = STAGES[stage_pick]
            elif u < c.dropout_rate + c.straggler_rate:
                stage_of[row] = "masked_input"  # too slow: the upload misses the deadline
        for item in c.dropout_schedule:
            if item["round"] == rnd:
                for client in item["clients"]:
                    if client in sampled:
                        stage_of[sampled.index(client)] = item["stage"]
        plan: dict[str, list[int]] = {}
        for row, stage in sorted(stage_of.items()):
            plan.setdefault(stage, []).append(row)
        return plan

    def train_clients(self, rnd: int, sampled: Sequence[int], faults: dict[str, list[int]]) -> list[ClientUpdate | None]:
        """Local training for every sampled client that will upload (row order)."""
        gone = {row for s in PRE_UPLOAD_STAGES for row in faults.get(s, ())}
        tasks, rows = [], []
        for row, client in enumerate(sampled):
            if row in gone:
                continue
            idx = self.parts[client]
            seed = batch_seed(self.config, rnd, client, secret=self.local.dp_sgd)
            tasks.append(TrainTask(client, rnd, self.params, self.dataset.x_train[idx],
                                   self.dataset.y_train[idx], self.local, self.build, seed))
            rows.append(row)
        updates: list[ClientUpdate | None] = [None] * len(sampled)
        for row, update in zip(rows, self.executor.run(tasks)):
            updates[row] = update
        return updates

    @property
    def weighted(self) -> bool:
        """Sample-weighted FedAvg (an extra coordinate carries the weight) unless user-level DP."""
        return weighted(self.config)

    @property
    def upload_width(self) -> int:
        """Coordinates in the row one client protects: the update (and its weight); a subclass
        that appends coordinates in :meth:`encode_updates` counts them here (bytes per round)."""
        return len(self.params) + int(self.weighted)

    def encode_updates(self, updates: Sequence[ClientUpdate | None]) -> tuple[np.ndarray, float | None]:
        """Rows the clients feed to the protocol, and the L2 bound every row satisfies.

        Weighted mode: row = [w_k * clip(delta_k), w_k] with w_k = n_k / max_j n_j (a public
        constant), so the server decodes sum(w delta) / sum(w) from the sum alone, whoever drops.
        User-level DP: row = clip(delta_k); with distributed noise each client's integer noise
        share is added inside the protocol, after quantization (see DistributedNoisePlan).
        """
        c = self.config
        rows = np.zeros((len(updates), len(self.params) + int(self.weighted)), dtype=np.float64)
        clip = c.update_clip if c.update_clip > 0 else None
        for row, update in enumerate(updates):
            if update is not None:  # a distributed noise share is added by the protocol, after encoding
                rows[row] = encode_row(update, clip=clip, weight_ref=max(self.sizes), weighted=self.weighted)
        if clip is None:
            return rows, None
        return rows, (math.sqrt(clip**2 + 1.0) if self.weighted else clip)

    def aggregate(self, vectors: np.ndarray, faults: dict[str, list[int]], clip: float | None) -> RoundOutcome:
        options = {}
        if self.noise_plan is not None:
            options = dict(scale=self.noise_plan.scale, client_noise=self.noise_plan.sample,
                           noise_headroom=self.noise_plan.headroom)
        return self.aggregator.aggregate(vectors, dropouts=faults, clip=clip, **options)

    def release_total(self, total: np.ndarray) -> np.ndarray:
        """The sum as it may leave the server: with central Gaussian noise for ``dp = "user"``."""
        c = self.config
        total = np.asarray(total, dtype=np.float64)
        if c.dp != "user":
            return total
        return add_gaussian_noise(total, noise_multiplier=c.noise_multiplier, clip_norm=c.update_clip,
                                  rng=self._noise_rng)

    def apply_aggregate(self, result: RoundOutcome) -> bool:
        """Decode the mean update from the released sum (after :meth:`release_total`) and take
        the server step. False if nothing counted."""
        c = self.config
        d = len(self.params)
        total = np.asarray(result.total, dtype=np.float64)
        if self.weighted:
            weight = float(total[d])
            if weight <= 0:
                return False
            mean = total[:d] / weight
        else:
            mean = total / max(c.expected_clients_per_round, 1.0)
        self.params = self.strategy.apply(self.params, mean.astype(np.float32)).astype(np.float32)
        return True

    def evaluate(self) -> tuple[float | None, float | None]:
        """(accuracy, loss) of the global model on the test split (None where not defined)."""
        set_flat(self._model, self.params)
        return evaluate(self._model, self.dataset.x_test, self.dataset.y_test, loss=self.local.loss)

    def global_model(self) -> nn.Module:
        """A fresh copy of the model holding the current global weights (e.g. after :meth:`run`)."""
        model = self.build()
        set_flat(model, self.params)
        return model

    def metrics(self) -> dict[str, float]:
        """The caller's ``evaluate(model)`` metrics of the global model ({} without the hook)."""
        if self.evaluate_hook is None:
            return {}
        set_flat(self._model, self.params)
        self._model.eval()
        with torch.no_grad():
            return check_metrics(self.evaluate_hook(self._model))

    # ----------------------------------------------------------------- loop
    def run_round(self, rnd: int, ledger: Ledger | None) -> RoundResult:
        """One round: the executor picks and trains the clients, the aggregator computes and
        releases their protected sum; the budget, the model update, evaluation and the ledger
        are the same whichever pair runs it."""
        start = time.perf_counter()
        cohort = self.round_executor.cohort(self, rnd)
        entry, epsilon = self.reserve_budget(ledger, rnd, cohort.reserve)
        trained = self.round_executor.train(self, rnd, cohort)

        def release(outcome: RoundOutcome) -> np.ndarray:
            # Commit first: the sum is used or shared only once the ledger holds its release. What
            # leaves is what the model uses (with the central noise of user-level DP).
            self.commit_release(ledger, entry, len(outcome.included))
            return self.release_total(outcome.total)

        done = self.round_aggregator.aggregate(self, rnd, cohort, trained, release)
        outcome, aborted = done.outcome, done.aborted
        if outcome is not None and not self.apply_aggregate(outcome):
            aborted = "no client's update counted"
        accuracy = loss = None
        metrics: dict[str, float] = {}
        if rnd % self.config.eval_every == 0 or rnd == self.config.rounds:
            accuracy, loss = self.evaluate()
            metrics = self.metrics()
        included = list(outcome.included) if outcome is not None else []
        per_param = outcome.bytes_up_per_param if outcome is not None else 0.0
        result_row = RoundResult(
            round=rnd, accuracy=accuracy, loss=loss, epsilon=epsilon, bytes_up_per_param=per_param,
            bytes_up_total=round(per_param * self.upload_width * len(included)), sampled=list(done.clients),
            included=included, dropped=done.dropped, train_loss=trained.train_loss, metrics=metrics,
            max_quantization_error=float(outcome.max_quantization_error) if outcome is not None else 0.0,
            seconds=time.perf_counter() - start, aborted=aborted,
        )
        self.close_reservation(ledger, entry, result_row)
        return result_row

    def run(
        self, *, resume: bool = False, on_round: Callable[[RoundResult], None] | None = None
    ) -> RunSummary:
        """Run (or continue, with ``resume``) the experiment; writes everything under ``out_dir``."""
        c = self.config
        summary = RunSummary(config=c, out_dir=self.out_dir, num_params=num_params(self._model))
        existing = ckpt_io.load(self.out_dir)
        start = 1
        if existing is not None:
            if not resume:
                raise ConfigError(f"{self.out_dir} already holds a run (round {existing.round}); "
                                  "pass --resume to continue it or choose another out_dir")
            if existing.fingerprint != c.fingerprint():
                raise ConfigError(f"{self.out_dir} holds a run with a different configuration; "
                                  "resume it with the same options or choose another out_dir")
            self.params = existing.params.astype(np.float32)
            self.strategy.load_state_arrays(existing.strategy_state)
            if existing.torch_rng_state is not None:
                torch.set_rng_state(torch.tensor(existing.torch_rng_state, dtype=torch.uint8))
            summary.rounds = [RoundResult(**m) for m in existing.metrics]
            summary.resumed_from = existing.round
            start = existing.round + 1
        elif (self.out_dir / LEDGER_FILE).exists() and not resume:
            raise ConfigError(f"{self.out_dir} holds a privacy ledger from an earlier run; pass --resume "
                              "to continue it or choose another out_dir")
        if existing is not None and self.accountant.is_private:
            if not (self.out_dir / LEDGER_FILE).exists():
                raise ConfigError(
                    f"{self.out_dir} holds a checkpoint of round {existing.round} but no privacy ledger: "
                    "resuming would count the budget from zero; restore ledger.db or start a new run "
                    "in another out_dir")
            if existing.ledger_head is None:
                raise ConfigError(f"the checkpoint in {self.out_dir} is not bound to a privacy ledger "
                                  "(written by an older version); start a new run in another out_dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        import tomli_w  # the "fl" extra
        (self.out_dir / "config.toml").write_text(tomli_w.dumps(c.to_sections()))
        ledger = self.open_ledger()
        try:
            if existing is not None and ledger is not None:
                bound = existing.ledger_head
                if not ledger.contains_head(int(bound["count"]), bound["hash"], bound["genesis"]):
                    raise ConfigError(
                        f"{self.out_dir / LEDGER_FILE} is not the ledger the checkpoint of round "
                        f"{existing.round} was written with (its head {bound['count']}:{bound['hash']} "
                        "is not in it): refusing to resume")
            self._loop(start, ledger, summary, on_round)
            _write_summary(self, summary, ledger)
        finally:
            if ledger is not None:
                ledger.close()
        return summary

    def _loop(self, start: int, ledger: Ledger | None, summary: RunSummary,
              on_round: Callable[[RoundResult], None] | None) -> None:
        c = self.config
        for rnd in range(start, c.rounds + 1):
            result = self.run_round(rnd, ledger)
            summary.rounds.append(result)
            ckpt_io.save(self.out_dir, ckpt_io.Checkpoint(
                round=rnd, params=self.params, strategy_state=self.strategy.state_arrays(),
                fingerprint=c.fingerprint(), seed=c.seed, metrics=[self.round_json(r) for r in summary.rounds],
                torch_rng_state=torch.get_rng_state().tolist(), ledger_head=_head(ledger),
            ))
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(self.round_json(result)) + "\n")
            if on_round is not None:
                on_round(result)


MAX_REPORTED_SITES = 50


def weighted(config: ExperimentConfig) -> bool:
    """Sample-weighted FedAvg (rows carry their weight) unless the DP protects whole clients."""
    return config.dp not in ("user", "user-distributed")


def batch_seed(config: ExperimentConfig, rnd: int, client: int, *, secret: bool) -> int:
    """The seed of a client's local training in a round: from the OS when it is ``secret`` (it
    also seeds DP-SGD noise, which may never derive from the public seed) unless the run is
    deterministic, else derived from the public ``(seed, round, client)`` (batch order only)."""
    if secret and not config.deterministic:
        return secrets.randbits(62)
    return int(np.random.SeedSequence([config.seed, rnd, 3, client]).generate_state(1)[0])


def encode_row(update: ClientUpdate, *, clip: float | None, weight_ref: int, weighted: bool) -> np.ndarray:
    """The row one client protects: ``clip(delta)``, weighted as ``[w * clip(delta), w]`` with
    ``w = min(1, n_k / weight_ref)`` (public: ``weight_ref`` is the largest partition's size, so
    a row stays within the bound the protocol's range is agreed for)."""
    delta = update.delta.astype(np.float64)
    if clip is not None:
        norm = float(np.linalg.norm(delta))
        if norm > clip:
            delta = delta * (clip / norm)
    if not weighted:
        return delta
    w = min(1.0, update.num_samples / weight_ref)
    return np.append(w * delta, w)


def builtin_setup(config: ExperimentConfig, dataset: Dataset | None = None
                  ) -> tuple[Dataset, list[np.ndarray], Callable[[], nn.Module]]:
    """A built-in scenario's dataset (``dataset``, or loaded), its partition into clients and
    the model builder: the same on every host that reads the same experiment."""
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, seed=config.seed)
    parts = partition(dataset, num_clients=config.num_clients, scheme=config.partition, alpha=config.alpha,
                      seed=config.seed)
    return dataset, parts, partial(build_model, config.model, dataset.input_shape, dataset.num_classes,
                                   hidden=config.hidden)


def local_training(config: ExperimentConfig, *, loss: Callable | None = None,
                   train: TrainHook | None = None) -> LocalTraining:
    """A client's local-training settings, as the experiment gives them."""
    return LocalTraining(
        epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
        proximal_mu=config.proximal_mu, dp_sgd=config.dp == "dpsgd", noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm, loss=loss, train=train, secure_noise=not config.deterministic,
    )


@lru_cache(maxsize=1)
def code_version() -> str:
    """``secagg <version>`` and, when run from a git checkout, its commit."""
    import subprocess

    from secagg import __version__

    try:
        sha = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"secagg {__version__}" + (f" (git {sha})" if sha else "")


def enforcing_accountant(config: ExperimentConfig) -> str:
    """The accountant that enforces the budget: the configured one, except for distributed
    discrete Gaussian noise, which only RDP has a proof for (PRV/PLD would treat it as Gaussian)."""
    return "rdp" if config.dp == "user-distributed" else config.accountant


def _head(ledger: Ledger | None) -> dict | None:
    if ledger is None:
        return None
    count, head_hash, genesis = ledger.head()
    return {"genesis": genesis, "count": count, "hash": head_hash}


def _write_summary(fed: Federation, summary: RunSummary, ledger: Ledger | None) -> None:
    from privacy.report import render_html

    final = summary.final
    data = {
        "name": fed.config.name, "rounds": len(summary.rounds), "final_accuracy": summary.final_accuracy,
        "epsilon": final.epsilon if final else 0.0, "delta": fed.config.delta if ledger else None,
        "protection": fed.config.protection, "dp": fed.config.dp, "num_params": summary.num_params,
        "bytes_up_total": sum(r.bytes_up_total for r in summary.rounds),
        "final_metrics": next((r.metrics for r in reversed(summary.rounds) if r.metrics), {}),
        "out_dir": str(fed.out_dir),
        "ledger": str(fed.out_dir / LEDGER_FILE) if ledger else None,
        "report": str(fed.out_dir / REPORT_FILE) if ledger else None,
    }
    if ledger is not None:
        data["ledger_head"] = ledger.verify().head
        data["ledger_key"] = str(fed.ledger_key_path())
        render_html(fed.out_dir / LEDGER_FILE, fed.out_dir / REPORT_FILE, key=fed.ledger_key(),
                    context=fed.report_context(len(summary.rounds)))
    (fed.out_dir / SUMMARY_FILE).write_text(json.dumps(data, indent=2))
    write_metrics_csv(fed.out_dir, summary.rounds)
    write_model(fed.out_dir, fed.global_model())
