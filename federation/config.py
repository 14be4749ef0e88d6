"""Experiment configuration: one flat, typed record; a TOML file groups it into sections.

``secagg run experiment.toml`` reads a file like::

    [data]
    dataset = "breast_cancer"
    num_clients = 10

    [training]
    rounds = 10
    clients_per_round = 10

    [protection]
    protection = "masking"

Section names are for reading only (every key is unique); a key in the wrong section, an
unknown key or a value of the wrong type is a :class:`ConfigError` naming the key.
:meth:`ExperimentConfig.validate` checks every cross-field rule and returns *all* problems
(``strict=True`` raises one error listing them), before any data is loaded or any client trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from federation.accounting import DP_MODES
from federation.aggregators import PROTECTIONS, STAGES
from federation.data import DATASETS, PARTITIONS
from federation.models import MODELS
from federation.strategies import STRATEGIES
from secagg.errors import ConfigError

SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_dir", "partition", "alpha", "num_clients"),
    "model": ("model", "hidden"),
    "training": ("rounds", "clients_per_round", "sampling", "sampling_rate", "local_epochs",
                 "batch_size", "lr", "momentum"),
    "strategy": ("strategy", "server_lr", "proximal_mu", "beta1", "beta2", "tau"),
    "protection": ("protection", "threshold", "bits", "update_clip"),
    "privacy": ("dp", "noise_multiplier", "max_grad_norm", "delta", "budget_epsilon", "accountant",
                "ledger_key"),
    "faults": ("dropout_rate", "straggler_rate", "dropout_schedule"),
    "run": ("name", "seed", "deterministic", "out_dir", "eval_every"),
}


@dataclass
class ExperimentConfig:
    """Every option of a federated experiment, with the defaults of a small tabular run."""

    # data
    dataset: str = "breast_cancer"
    data_dir: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    num_clients: int = 10
    # model
    model: str = "logreg"
    hidden: int = 64
    # training
    rounds: int = 10
    clients_per_round: int = 10
    sampling: str = "fixed"  # "fixed" count per round, or "poisson" with sampling_rate
    sampling_rate: float = 1.0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    # strategy
    strategy: str = "fedavg"
    server_lr: float | None = None  # None: 1.0 for fedavg/fedprox, 0.01 for fedadam/fedyogi
    proximal_mu: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    # protection
    protection: str = "masking"
    threshold: int | None = None
    bits: int = 32
    update_clip: float = 10.0
    # privacy
    dp: str = "none"
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    budget_epsilon: float | None = None
    accountant: str = "prv"
    ledger_key: str = ""  # HMAC key file of the privacy ledger; "" = ledger.key in out_dir (0600)
    # faults
    dropout_rate: float = 0.0
    straggler_rate: float = 0.0
    dropout_schedule: list[dict[str, Any]] = field(default_factory=list)
    # run
    name: str = "experiment"
    seed: int = 0
    deterministic: bool = False
    out_dir: str = "out/experiment"
    eval_every: int = 1

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build from a flat or sectioned mapping; unknown keys and wrong types are errors.

        Values must already have their option's type (a TOML ``noise_multiplier = "1.5"`` is
        an error, not a silent conversion); :meth:`set` parses command-line strings.
        """
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, dict):
                for sub, sub_value in value.items():
                    if sub not in SECTIONS[key]:
                        home = next((s for s, ks in SECTIONS.items() if sub in ks), None)
                        hint = f" (it belongs in [{home}])" if home else _did_you_mean(sub, SECTIONS[key])
                        raise ConfigError(f"unknown key {sub!r} in [{key}]{hint}")
                    flat[sub] = sub_value
            elif isinstance(value, dict):
                raise ConfigError(f"unknown section [{key}]{_did_you_mean(key, SECTIONS, quote='[]')}; "
                                  f"sections are {', '.join(f'[{k}]' for k in SECTIONS)}")
            else:
                flat[key] = value
        config = cls()
        for key, value in flat.items():
            config.set(key, value, from_text=False)
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def set(self, key: str, value: Any, *, from_text: bool = True) -> None:
        """Set one option; checks name and type. With ``from_text`` a string (from the command
        line: ``--set lr=0.05``) is parsed to the option's type; without, it must have it."""
        types = {f.name: f.type for f in fields(self)}
        if key not in types:
            raise ConfigError(f"unknown option {key!r}{_did_you_mean(key, types)}; "
                              f"known options: {', '.join(sorted(types))}")
        setattr(self, key, _coerce(key, types[key], value, from_text=from_text))

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The config grouped as in the TOML file (None values left out: TOML has no null).

        With the caller's own data or model, the options that only describe a built-in dataset
        (partition, alpha, data_dir) or model (hidden) are left out: they were not used.
        """
        flat = dataclasses.asdict(self)
        unused = set()
        if str(self.dataset).startswith(CUSTOM_PREFIX):
            unused |= {"data_dir", "partition", "alpha"}
        if str(self.model).startswith(CUSTOM_PREFIX):
            unused.add("hidden")
        return {s: {k: flat[k] for k in keys if flat[k] is not None and k not in unused}
                for s, keys in SECTIONS.items()}

    def fingerprint(self) -> str:
        """Hash of everything that shapes the model and the privacy spend (not rounds or paths)."""
        flat = dataclasses.asdict(self)
        for key in ("rounds", "out_dir", "data_dir", "name", "eval_every", "ledger_key"):
            flat.pop(key)
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- checking
    @property
    def effective_server_lr(self) -> float:
        from federation.strategies import default_server_lr

        return self.server_lr if self.server_lr is not None else default_server_lr(self.strategy)

    @property
    def expected_clients_per_round(self) -> float:
        if self.sampling == "poisson":
            return self.sampling_rate * self.num_clients
        return float(self.clients_per_round)

    def validate(self, *, strict: bool = True) -> list[ConfigError]:
        """Every cross-field problem; with ``strict`` raise one ConfigError listing them all."""
        errors: list[str] = []

        def need(cond: bool, message: str) -> None:
            if not cond:
                errors.append(message)

        for key, allowed in (("dataset", DATASETS), ("partition", PARTITIONS), ("model", MODELS),
                             ("strategy", STRATEGIES), ("protection", PROTECTIONS), ("dp", DP_MODES),
                             ("sampling", ("fixed", "poisson"))):
            if key in ("dataset", "model") and str(getattr(self, key)).startswith(CUSTOM_PREFIX):
                continue  # the caller's own model or data, given to Federation(model=, client_data=)
            if key == "model" and is_import_path(self.model):
                continue  # "package.module:function" returning the model, imported when built
            need(getattr(self, key) in allowed,
                 f"unknown {key} {getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        need((self.model == "mf") == (self.dataset in ("shops", "movielens")),
             "model 'mf' (matrix factorisation) goes with dataset 'shops' or 'movielens', and they with it")
        need(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        need(self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}")
        if self.sampling == "fixed":
            need(1 <= self.clients_per_round <= self.num_clients,
                 f"clients_per_round={self.clients_per_round} must be between 1 and "
                 f"num_clients={self.num_clients}")
        else:
            need(0 < self.sampling_rate <= 1, f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.threshold is not None:
            need(self.protection in ("masking", "masking-sparse"),
                 "threshold is a masking option; remove it or use protection = 'masking'")
            cohort = self.clients_per_round if self.sampling == "fixed" else self.num_clients
            need(2 <= self.threshold <= cohort,
                 f"threshold={self.threshold} must be between 2 and the number of clients in a "
                 f"round ({cohort}): no round could ever be unmasked")
        need(8 <= self.bits <= 32, f"bits must be between 8 and 32, got {self.bits}")
        need(self.update_clip > 0 or self.protection == "none",
             f"protection {self.protection!r} needs update_clip > 0 (it bounds the encoded range)")
        need(self.update_clip > 0 or self.dp not in ("user", "user-distributed"),
             "user-level DP needs update_clip > 0 (it is the sensitivity)")
        need(self.dp != "user-distributed" or self.protection in ("masking", "masking-sparse"),
             "dp = 'user-distributed' adds noise in shares that only masking hides; use masking")
        need(self.dp != "user-distributed" or (self.threshold is not None and self.sampling == "fixed"),
             "dp = 'user-distributed' calibrates each noise share to the minimum number of survivors: "
             "set threshold explicitly and use sampling = 'fixed'")
        need(self.proximal_mu == 0 or self.strategy == "fedprox",
             "proximal_mu is a FedProx option; set strategy = 'fedprox'")
        need(self.proximal_mu >= 0, f"proximal_mu must be >= 0, got {self.proximal_mu}")
        need(self.dp == "none" or self.noise_multiplier > 0,
             f"dp = {self.dp!r} needs noise_multiplier > 0")
        need(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        need(self.budget_epsilon is None or self.budget_epsilon > 0,
             f"budget_epsilon must be > 0, got {self.budget_epsilon}")
        need(self.dp == "none" or self.budget_epsilon is not None,
             f"dp = {self.dp!r} needs budget_epsilon: the privacy ledger refuses any round over it")
        need(self.dp != "none" or self.budget_epsilon is None,
             "budget_epsilon is set but dp = 'none': nothing would be accounted; choose a dp mode")
        need(0 <= self.dropout_rate < 1 and 0 <= self.straggler_rate < 1,
             "dropout_rate and straggler_rate must be in [0, 1)")
        need(self.local_epochs >= 1 and self.batch_size >= 1 and self.lr > 0,
             "local_epochs, batch_size must be >= 1 and lr > 0")
        need(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        for i, item in enumerate(self.dropout_schedule):
            if not isinstance(item, dict) or set(item) != {"round", "stage", "clients"}:
                errors.append(f"dropout_schedule[{i}] must be a table with round, stage, clients")
                continue
            need(item["stage"] in STAGES,
                 f"dropout_schedule[{i}]: unknown stage {item['stage']!r}; choose one of {', '.join(STAGES)}")
            need(all(isinstance(c, int) and 0 <= c < self.num_clients for c in item["clients"]),
                 f"dropout_schedule[{i}]: clients must be ids in [0, {self.num_clients})")
        problems = [ConfigError(m) for m in errors]
        if strict and problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return problems


CUSTOM_PREFIX = "custom:"  # model / dataset supplied as Python objects (see federation.custom)


def is_import_path(name: str) -> bool:
    """``package.module:function``: a model builder named by where to import it from."""
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", str(name)))


def _did_you_mean(name: str, known: Any, *, quote: str = "''") -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {quote[0]}{close[0]}{quote[-1]}?)" if close else ""


def _coerce(key: str, type_text: str, value: Any, *, from_text: bool = False) -> Any:
    """Check ``value`` against the option's type; with ``from_text``, parse a command-line string."""
    optional = "None" in type_text
    if value is None and optional:
        return None
    if from_text and optional and isinstance(value, str) and value.lower() in ("none", "null", ""):
        return None
    base = type_text.replace(" | None", "")
    if not from_text and isinstance(value, str) and base != "str":
        try:
            _coerce(key, type_text, value, from_text=True)
            hint = "; write the value without quotes"
        except ConfigError:
            hint = ""
        raise ConfigError(f"option {key!r} expects {type_text}, got the string {value!r}{hint}")
    try:
        if base == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if base.startswith("list"):
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, list):
                raise ValueError(value)
            return value
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"option {key!r} expects {type_text}, got {value!r}") from None
    raise ConfigError(f"option {key!r} has an unsupported type {type_text}")
