"""Run an experiment the way `secagg run` and `secagg demo` do: options, backend, console output.

The command line only parses; what a run means lives here, once:

* :func:`apply_options` -- command-line overrides onto a config (and the default data folder);
* :func:`open_federation` -- the only place a backend name becomes a federation: in this
  process, or on Ray (what runs there: :func:`federation.transport.ray_backend.ray_federation`);
* :func:`run_experiment` / :func:`run_demo` -- run it, printing progress and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from federation.config import ExperimentConfig
from federation.engine import Federation
from secagg.errors import ConfigError

BACKENDS = ("inprocess", "ray")
RECOMMENDER_DATASETS = ("shops", "movielens")


def apply_options(config: ExperimentConfig, options: Mapping[str, Any] | None = None, sets: Sequence[str] = ()) -> None:
    """Set ``options`` (option -> value; None leaves the config's value) and ``sets`` ("KEY=VALUE"
    texts, parsed to each option's type) on ``config``; fill ``data_dir`` with the default folder
    (``../shared/data``) when neither names one."""
    for option, value in (options or {}).items():
        if value is not None:
            config.set(option, value)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        config.set(key.strip(), value.strip())
    if config.data_dir is None:
        from federation.data import default_data_dir

        found = default_data_dir()
        config.data_dir = str(found) if found else None


@contextmanager
def open_federation(config: ExperimentConfig, *, backend: str = "inprocess", ray_address: str | None = None,
                    num_cpus: int | None = None, data: Any = None) -> Iterator[Federation]:
    """The federation for ``config`` on ``backend``, and its teardown (a Ray this call started stops).

    ``"inprocess"``: clients train and run the protocol in this process. ``"ray"``: on a new local
    Ray with ``num_cpus``, or the cluster at ``ray_address``, clients train as Ray tasks and the
    protocol's parties run in Ray actors (see ``ray_federation``). The recommender datasets keep
    every shop's customer embeddings in this process, so they run in process only; ``data`` (an
    :class:`~federation.recsys.interactions.Interactions`, e.g. a generator preset) replaces the
    data the config names for them.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if config.dataset in RECOMMENDER_DATASETS:
        if backend != "inprocess":
            raise ConfigError("the shops scenario keeps every shop's customer embeddings in its own state; "
                              "run it with --backend inprocess")
        from federation.recsys.federation import ShopsFederation

        yield ShopsFederation(config, data=data)
        return
    if data is not None:
        raise ConfigError("only the recommender datasets (shops, movielens) take data from the caller here")
    if backend == "inprocess":
        yield Federation(config)
        return
    from federation.transport.ray_backend import ray_federation, ray_session

    with ray_session(ray_address, num_cpus):
        yield ray_federation(config)


def run_experiment(config: ExperimentConfig | str | Path, *, options: Mapping[str, Any] | None = None,
                   sets: Sequence[str] = (), backend: str = "inprocess", ray_address: str | None = None,
                   num_cpus: int | None = None, resume: bool = False, as_json: bool = False,
                   noun: str = "client", data: Any = None) -> int:
    """`secagg run`: build the federation (every check happens before training), run it, print
    each round and the summary (JSON lines with ``as_json``); return the exit status. ``data``: see
    :func:`open_federation`."""
    import torch

    from federation.console import print_summary, progress

    if not isinstance(config, ExperimentConfig):
        config = ExperimentConfig.from_toml(config)
    apply_options(config, options, sets)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    with open_federation(config, backend=backend, ray_address=ray_address, num_cpus=num_cpus, data=data) as fed:
        with progress(fed, as_json=as_json, noun=noun) as on_round:
            summary = fed.run(resume=resume, on_round=on_round)
        print_summary(fed, summary, as_json=as_json, noun=noun)
        if config.dataset in RECOMMENDER_DATASETS:  # central / shop-alone / popularity comparison
            from federation.recsys.report import print_comparison

            print_comparison(fed, as_json=as_json)
    return 0


def run_demo(name: str, *, preset: str = "default", options: Mapping[str, Any] | None = None,
             sets: Sequence[str] = (), resume: bool = False, as_json: bool = False, **backend: Any) -> int:
    """`secagg demo`: scenario ``name`` with the given overrides. Each run gets its own output
    folder (so the demo can be run again); ``resume`` continues the latest one. ``preset`` (shops
    only) picks the synthetic generator's preset and the scenario options tuned for it
    (:data:`federation.scenarios.SHOPS_PRESET_OPTIONS`); its runs go to their own folder."""
    from federation.scenarios import SCENARIOS, scenario_config, shops_preset_config

    options = dict(options or {})
    dp_off = options.get("dp") == "none" or any(s.replace(" ", "") == "dp=none" for s in sets)
    if preset != "default" and (name != "shops" or options.get("data_dir") is not None):
        raise ConfigError(f"--preset {preset} picks synthetic shops: use it with --scenario shops and "
                          "without --data-dir")
    # an unknown name or preset is a ConfigError here
    config = shops_preset_config(preset, dp=not dp_off) if name == "shops" else scenario_config(name, dp=not dp_off)
    scenario = SCENARIOS[name]
    if options.get("out_dir") is None:
        base = Path(config.out_dir if preset == "default" else f"{config.out_dir}-{preset}")
        if resume:
            runs = sorted(p.parent for p in base.glob("*/checkpoint.json"))
            if not runs:
                raise ConfigError(f"no {name} demo run to resume under {base}/; pass --out DIR")
            config.out_dir = str(runs[-1])
        else:
            config.out_dir = str(base / time.strftime("%Y%m%d-%H%M%S"))
    if name == "shops" and options.get("data_dir") is not None:
        config.dataset = "movielens"  # the data folder holds the user's MovieLens files for this scenario
    apply_options(config, options, sets)
    if not config.protection.startswith("masking") and not any(s.strip().startswith("threshold") for s in sets):
        config.threshold = None  # the scenario's masking threshold means nothing for other protections
    data = None
    if preset != "default":
        from federation.recsys.synthetic import PRESETS, generate_shops

        data = generate_shops(PRESETS[preset], seed=config.seed)
    if not as_json:
        title = scenario.title if data is None else f"{data.num_shops} shops{scenario.title[7:]} ({preset} preset)"
        print(f"secagg demo: {title}")
        if config.dataset == "shops":
            print("  Data: synthetic shops (generated, seeded; see docs/recommendation.md), not real customers.")
        print(f"  {scenario.story}")
        print(f"  protection={config.protection}  dp={config.dp}  rounds={config.rounds}  "
              f"output={config.out_dir}")
        print()
    return run_experiment(config, resume=resume, as_json=as_json, noun=scenario.client_noun, data=data, **backend)
