"""Bring your own model and data: turn a user's PyTorch model, per-site arrays and hooks into
what the engine runs.

``Federation(model=..., client_data=[...], loss=..., test_data=..., train=..., evaluate=...)``
calls :func:`custom_setup`. Each site's data stays a separate array pair (one row per record);
the engine trains each site only on its own rows. Everything is checked here, before any
site trains, and every problem is a :class:`~secagg.errors.ConfigError` saying what to pass
instead.

The saved configuration records what was run: ``model = "custom: module:qualname"`` names
the builder (or the class of the module instance) and ``dataset = "custom: N sites, M records"``
says the data came from the caller (it is not stored anywhere by the engine).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from federation.config import CUSTOM_PREFIX, ExperimentConfig
from federation.data import Dataset
from secagg.errors import ConfigError

CUSTOM = CUSTOM_PREFIX.rstrip(":")  # config.model / config.dataset start "custom:" for the caller's own

#: ``train(model, loader) -> float | None``: train ``model`` in place on one site's batches,
#: return the mean training loss (or None). The engine computes the update itself.
TrainHook = Callable[[nn.Module, torch.utils.data.DataLoader], "float | None"]
#: ``evaluate(model) -> {"name": value}``: metrics of the global model after a round.
EvaluateHook = Callable[[nn.Module], Mapping[str, float]]


@dataclass(frozen=True)
class CustomSetup:
    """The engine's view of the caller's model and data."""

    build: Callable[[], nn.Module]
    dataset: Dataset
    parts: list[np.ndarray]
    model_name: str
    dataset_name: str


def is_custom(name: str) -> bool:
    return isinstance(name, str) and name.startswith(CUSTOM + ":")


def describe(obj: Any) -> str:
    """``module:qualname`` of a function or class (of the instance's class for a module)."""
    target = obj if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj)) else type(obj)
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}:{name}"


def model_builder(model: Any) -> tuple[Callable[[], nn.Module], str]:
    """A zero-argument builder of fresh models, and its description for the saved config.

    ``model`` is an ``nn.Module`` (every site starts from a deep copy of it) or a callable
    returning one (a class or a function).
    """
    if isinstance(model, nn.Module):
        template = copy.deepcopy(model)
        return (lambda: copy.deepcopy(template)), f"{CUSTOM}: {describe(model)}"
    if callable(model):
        return model, f"{CUSTOM}: {describe(model)}"
    raise ConfigError(
        f"model must be a torch.nn.Module or a function returning one, got {type(model).__name__}; "
        "pass e.g. model=lambda: torch.nn.Linear(13, 3)"
    )


def _as_array(value: Any, what: str, *, scalar_ok: bool = False) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{what} is ragged or holds non-numbers; pass a numeric array (or tensor) with "
                          "one equal-length row per record") from None
    if array.dtype == object:
        raise ConfigError(f"{what} is ragged or holds non-numbers; pass a numeric array with one row per record")
    if np.iscomplexobj(array):
        raise ConfigError(f"{what} is complex; pass real-valued features")
    if array.ndim == 0 and not scalar_ok:
        raise ConfigError(f"{what} is a scalar; pass one row per record")
    return array


def _site_arrays(item: Any, index: int, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one site from an ``(x, y)`` pair or a map-style torch Dataset of pairs."""
    where = where or f"client_data[{index}]"
    if isinstance(item, torch.utils.data.Dataset) and not isinstance(item, (tuple, list)):
        try:
            pairs = [item[i] for i in range(len(item))]  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{where} is a dataset without a length; pass an (x, y) pair of arrays") from None
        if not pairs:
            raise ConfigError(f"{where} holds no records; every site needs at least one")
        try:
            xs, ys = zip(*pairs)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: each record must be an (x, y) pair") from None
        x = np.stack([_as_array(v, f"{where} feature") for v in xs])
        y = np.stack([_as_array(v, f"{where} label", scalar_ok=True) for v in ys])
        return x, y
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ConfigError(f"{where} must be an (x, y) pair of arrays (one row per record) or a torch Dataset, "
                          f"got {type(item).__name__}")
    x, y = _as_array(item[0], f"{where} x"), _as_array(item[1], f"{where} y")
    if len(x) != len(y):
        raise ConfigError(f"{where}: x has {len(x)} rows but y has {len(y)}; give one label per record")
    if len(x) == 0:
        raise ConfigError(f"{where} holds no records; every site needs at least one")
    return x, y


def _features(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) \
        else x


def _labels(y: np.ndarray) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        return y.astype(np.float32)
    raise ConfigError(f"labels of dtype {y.dtype} are not supported; pass integer classes or float targets")


def custom_setup(model: Any, client_data: Sequence[Any], test_data: Any = None) -> CustomSetup:
    """Check the caller's model and per-site data; lay the sites out for the engine."""
    if model is None:
        raise ConfigError("client_data was given without model=; pass the model the sites train")
    if client_data is None:
        raise ConfigError("model= was given without client_data=; pass one (x, y) pair per site")
    if isinstance(client_data, (str, bytes)) or not isinstance(client_data, Sequence) or isinstance(
            client_data, torch.utils.data.Dataset):
        raise ConfigError("client_data must be a list with one (x, y) pair (or torch Dataset) per site")
    if len(client_data) == 0:
        raise ConfigError("client_data is empty; pass one (x, y) pair per site")
    build, model_name = model_builder(model)
    sites = [_site_arrays(item, i) for i, item in enumerate(client_data)]
    shapes = {x.shape[1:] for x, _ in sites}
    if len(shapes) > 1:
        raise ConfigError(f"the sites' records have different shapes {sorted(shapes)}; every site must "
                          "feed the same model")
    label_shapes = {y.shape[1:] for _, y in sites}
    if len(label_shapes) > 1:
        raise ConfigError(f"the sites' labels have different shapes {sorted(label_shapes)}")
    x_train = _features(np.concatenate([x for x, _ in sites]))
    y_train = _labels(np.concatenate([y for _, y in sites]))
    bounds = np.cumsum([0] + [len(y) for _, y in sites])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sites))]
    if test_data is None:
        x_test, y_test = x_train[:0], y_train[:0]
    else:
        x_test, y_test = _site_arrays(test_data, 0) if isinstance(test_data, torch.utils.data.Dataset) \
            else _pair(test_data)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ConfigError(f"test_data records have shape {x_test.shape[1:]}, the sites' {x_train.shape[1:]}")
        x_test, y_test = _features(x_test), _labels(y_test)
    classes = int(y_train.max()) + 1 if y_train.dtype == np.int64 and len(y_train) else 0
    dataset = Dataset("custom", x_train, y_train, x_test, y_test, classes)
    name = f"{CUSTOM}: {len(sites)} sites, {len(y_train)} records"
    _check_model(build, x_train[:2], model_name)
    return CustomSetup(build, dataset, parts, model_name, name)


def _pair(test_data: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(test_data, (tuple, list)) or len(test_data) != 2:
        raise ConfigError("test_data must be an (x, y) pair of arrays or a torch Dataset")
    x, y = _as_array(test_data[0], "test_data x"), _as_array(test_data[1], "test_data y")
    if len(x) != len(y):
        raise ConfigError(f"test_data: x has {len(x)} rows but y has {len(y)}")
    return x, y


def _check_model(build: Callable[[], nn.Module], sample: np.ndarray, name: str) -> None:
    """Build once and run two records through it, so a wrong model fails now, not in round 1."""
    try:
        model = build()
    except Exception as exc:  # the caller's code: report it as a configuration problem
        raise ConfigError(f"building the model ({name}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model builder ({name}) returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"the model ({name}) has no trainable parameters")
    try:
        with torch.no_grad():
            model.eval()
            model(torch.as_tensor(sample))
    except Exception as exc:
        raise ConfigError(f"the model ({name}) cannot take the sites' records of shape "
                          f"{tuple(sample.shape[1:])}: {type(exc).__name__}: {exc}") from exc


#: options that describe a built-in dataset or model; with client_data= they have no meaning
_BUILTIN_ONLY = ("dataset", "data_dir", "partition", "alpha", "model", "hidden")


def build_config(config: ExperimentConfig | None, options: Mapping[str, Any],
                 custom: CustomSetup | None, dataset: Dataset | None = None) -> ExperimentConfig:
    """The configuration a Federation runs: ``config`` (or the defaults) with ``options`` set,
    and the caller's model and data recorded. ``config`` itself is never modified."""
    passed = config is not None
    if passed and not options and custom is None and (dataset is None or config.dataset == dataset.name):
        return config
    config = ExperimentConfig() if config is None else dataclasses.replace(config)
    given = dict(options)
    if custom is not None:
        wrong = sorted(k for k in given if k in _BUILTIN_ONLY)
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} describe a built-in dataset or model; with client_data= "
                              "each list entry is one site and model= is the model, so leave them out")
        if "num_clients" in given and given["num_clients"] != len(custom.parts):
            raise ConfigError(f"num_clients={given['num_clients']} but client_data holds "
                              f"{len(custom.parts)} sites; leave num_clients out")
    for key, value in given.items():
        config.set(key, value, from_text=False)
    if custom is not None:
        config.model, config.dataset = custom.model_name, custom.dataset_name
        config.num_clients = len(custom.parts)
        if "clients_per_round" not in given:  # every site in every round, unless a config says fewer
            config.clients_per_round = (min(config.clients_per_round, config.num_clients) if passed
                                        else config.num_clients)
    elif dataset is not None and config.dataset != dataset.name:
        config.dataset = f"{CUSTOM_PREFIX} {dataset.name}"
    return config


def check_metrics(values: Any) -> dict[str, float]:
    """The evaluate hook's answer as ``{name: float}``; anything else is a ConfigError."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"the evaluate hook returned {type(values).__name__}; return a dict such as "
                          "{'f1': 0.8}")
    out: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ConfigError(f"the evaluate hook returned {name!r}: {value!r}; metric names must be strings "
                              "and values numbers")
        out[name] = float(value)
    return out


def load_app(spec: str, *, what: str = "--app") -> Callable[[], Any]:
    """The function named by ``"package.module:function"`` (as ``secagg join --app`` takes it;
    ``what`` names the option in error messages).

    The module is imported from ``sys.path`` or, failing that, from the working directory
    (searched last, so it never shadows an installed package): a site keeps its data loader
    and model in its own code, next to where it runs ``secagg``.
    """
    import importlib
    import os
    import sys

    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} expects package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} {spec}: cannot import {module_name!r} ({exc}); run from the folder that "
                          "holds it or add that folder to PYTHONPATH") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"{what} {spec}: module {module_name!r} has no {attr!r}")
    if not callable(target):
        raise ConfigError(f"{what} {spec}: {attr!r} is not a function")
    return target


def site_data(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Call the ``--app`` function and check what it returns: this site's ``(x, y)`` records."""
    loader = load_app(spec)
    try:
        data = loader()
    except Exception as exc:  # the site's own code: report it as a configuration problem
        raise ConfigError(f"--app {spec} failed: {type(exc).__name__}: {exc}") from exc
    x, y = _site_arrays(data, 0, where=f"what --app {spec} returned")
    return _features(x), _labels(y)
