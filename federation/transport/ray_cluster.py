"""Connecting to Ray: a fresh local Ray, or an existing cluster by address -- never a silent join.

Rules:

* No address: a new local Ray is started for this run (``address="local"``) with
  ``num_cpus`` CPUs, even when another Ray is running on the machine, and stopped at the end.
* ``HOST:PORT`` (the GCS address ``ray start --head`` prints) or ``"auto"``: the driver
  joins that cluster. ``num_cpus`` is refused there (the cluster's nodes decide). The
  package is shipped to the cluster's workers in the job's ``runtime_env`` (``py_modules``),
  so the nodes need Ray and the third-party dependencies, not this package.
* Token authentication (Ray >= 2.52 clusters started with ``RAY_AUTH_MODE=token``): Ray
  only enables it for an explicit address when ``RAY_AUTH_MODE=token`` is set. When it is
  unset and a token is available (``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``,
  or ``~/.ray/auth_token``), it is set here, so the token is presented; set
  ``RAY_AUTH_MODE=disabled`` to opt out.
* ``ray://`` (Ray Client) addresses are refused with a ConfigError: the backend's driver
  must run on a cluster node (or be submitted as a Ray job), because Ray Client proxies
  every call through one gRPC connection and needs its own server on the head node.
"""

from __future__ import annotations

import os
from pathlib import Path

from secagg.errors import ConfigError

AUTH_MODE = "RAY_AUTH_MODE"


def token_available(env: dict[str, str] | None = None) -> bool:
    """Whether a Ray authentication token is configured for this process."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH")
    candidate = Path(path) if path else Path.home() / ".ray" / "auth_token"
    return candidate.is_file() and candidate.stat().st_size > 0


def init_kwargs(address: str | None, num_cpus: int | None, env: dict[str, str] | None = None) -> dict:
    """The ``ray.init`` arguments for ``address`` / ``num_cpus`` (and the auth mode set in ``env``)."""
    env = os.environ if env is None else env
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not address:
        return {**kwargs, "address": "local", "num_cpus": num_cpus}
    if address.startswith("ray://"):
        raise ConfigError(
            f"Ray Client addresses ({address}) are not supported: run the command on a node of the "
            "cluster with --ray-address HOST:PORT (the GCS address `ray start --head` prints), or "
            "submit it with `ray job submit`"
        )
    if num_cpus is not None:
        raise ConfigError("--num-cpus applies to a local Ray only; an existing cluster's nodes set their CPUs")
    if AUTH_MODE not in env and token_available(env):
        env[AUTH_MODE] = "token"
    import federation
    import privacy
    import secagg

    return {**kwargs, "address": address, "runtime_env": {"py_modules": [secagg, federation, privacy]}}


def require_ray(*, initialized: bool = False):
    """The ``ray`` module (``initialized``: and Ray running), or a ConfigError saying what to do."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backend needs Ray: pip install 'secagg[ray]'") from None
    if initialized and not ray.is_initialized():
        raise ConfigError("Ray is not initialised; call start_ray() or ray.init() first")
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start a local Ray or join the cluster at ``address``; True if this call started or joined it."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = init_kwargs(address, num_cpus)
    if address and os.environ.get(AUTH_MODE) == "token":
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config: re-read RAY_AUTH_MODE, as Ray's own token setup does
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        hint = ""
        text = str(exc)
        if "auth" in text.lower() or "token" in text.lower():
            hint = (" -- the cluster uses token authentication: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                    "to its token (`ray get-auth-token` on the head node)")
        raise ConfigError(f"could not connect to Ray at {address or 'a new local instance'}: "
                          f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}{hint}") from None
    return True
