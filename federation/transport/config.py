"""TOML configuration of `secagg serve` and `secagg join` (see examples/server.toml, client.toml).

Relative paths in a config file are resolved against the file's directory, so a bundle
(config + credential directory) can be moved as one folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import warnings
from pathlib import Path

import numpy as np

from federation.transport.grpc_client import ClientSettings
from federation.transport.grpc_server import ServerSettings
from secagg.errors import ConfigError

SERVER_KEYS = {f.name for f in dataclasses.fields(ServerSettings)}


def _renamed(table: dict, old: str, new: str, where: str) -> None:
    """Move ``table[old]`` to ``table[new]``: the old spelling still loads, with a warning."""
    if old not in table:
        return
    if new in table:
        raise ConfigError(f"{where}: both `{new}` and its old name `{old}` are set; keep `{new}`")
    warnings.warn(f"{where}: `{old}` is now called `{new}`; rename it (`{old}` will stop loading in a later "
                  "release)", FutureWarning, stacklevel=3)
    table[new] = table.pop(old)


def _load(path: str | os.PathLike) -> tuple[dict, Path]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f), p.resolve().parent
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


@dataclasses.dataclass
class ServerConfig:
    settings: ServerSettings
    credentials: Path
    state_dir: Path | None
    training: Path | None = None  # experiment TOML: train a model instead of summing given vectors


def _protection_name(name: object, path: str | os.PathLike) -> str:
    """A protection's name as written in a TOML file; the old name "plain" of "none" still
    loads, with a warning (protection = "none" and dp = "none" in the experiment say "none")."""
    if name == "plain":
        warnings.warn(f'{path}: "plain" is now called "none" (no protection); write "none", as '
                      '"plain" will stop loading in a later release', FutureWarning, stacklevel=3)
        return "none"
    return str(name)


def load_server_config(path: str | os.PathLike) -> ServerConfig:
    data, base = _load(path)
    table = dict(data.get("server", {}))
    _renamed(table, "mode", "protection", f"{path} [server]")
    if "protection" in table:
        table["protection"] = _protection_name(table["protection"], path)
    creds = _resolve(base, table.pop("credentials", None))
    if creds is None:
        raise ConfigError(f"{path}: [server] needs `credentials`, the directory written by `secagg certs issue --server`")
    state_dir = _resolve(base, table.pop("state_dir", None))
    training = _resolve(base, table.pop("training", None))
    crl = _resolve(base, table.pop("crl", None)) or creds / "crl.pem"
    unknown = sorted(set(table) - SERVER_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown [server] keys {unknown}; known: {sorted(SERVER_KEYS)}")
    settings = ServerSettings(**table, crl=str(crl))
    settings.options = dict(settings.options)
    settings.check()
    return ServerConfig(settings, creds, state_dir, training)


@dataclasses.dataclass
class ClientConfig:
    settings: ClientSettings
    credentials: Path
    input: dict
    base: Path
    training: dict | None = None  # [client.training]: experiment (TOML path), index (data partition)


def load_client_config(path: str | os.PathLike) -> ClientConfig:
    data, base = _load(path)
    table = dict(data.get("client", {}))
    _renamed(table, "modes", "protections", f"{path} [client]")
    creds = _resolve(base, table.pop("credentials", None))
    if creds is None:
        raise ConfigError(f"{path}: [client] needs `credentials`, the directory written by `secagg certs issue ID`")
    inp = dict(table.pop("input", {"kind": "synthetic"}))
    training = table.pop("training", None)
    if training is not None:
        training = dict(training)
        if "experiment" not in training:
            raise ConfigError(f"{path}: [client.training] needs `experiment`, the experiment TOML the server trains")
        training["experiment"] = _resolve(base, training["experiment"])
    known = {f.name for f in dataclasses.fields(ClientSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown [client] keys {unknown}; known: {sorted(known)} and [client.input]")
    if "protections" in table:
        table["protections"] = tuple(_protection_name(m, path) for m in table["protections"])
    # Round ids this client signed in survive restarts: by default next to the credentials.
    table["round_ids"] = str(_resolve(base, table.get("round_ids")) or creds / "round-ids.txt")
    if "keyholder" in table and (type(table["keyholder"]) is not int or table["keyholder"] < 1):
        raise ConfigError(
            f"{path}: [client] keyholder must be the client id (an integer >= 1) of the ckks key holder this "
            "client trusts, the one the CA issued with `secagg certs issue ID --role keyholder`"
        )
    return ClientConfig(ClientSettings(**table), creds, inp, base, training)


def input_source(cfg: dict, base: Path, client_id: int):
    """``round -> update vector`` from a [client.input] table.

    kind = "npy":       path = "update.npy" (the same vector every round), or a directory
                        holding round-<r>.npy files;
    kind = "synthetic": dim, seed (default: the client id), scale (default 1.0) -- a
                        reproducible Gaussian vector per round, for trials and tests.
    """
    kind = cfg.get("kind", "synthetic")
    if kind == "npy":
        path = _resolve(base, cfg.get("path"))
        if path is None:
            raise ConfigError("[client.input] kind = 'npy' needs `path`")

        def from_npy(r: int) -> np.ndarray:
            p = path / f"round-{r}.npy" if path.is_dir() else path
            try:
                return np.load(p, allow_pickle=False)
            except FileNotFoundError:
                raise ConfigError(f"update file {p} not found") from None

        return from_npy
    if kind == "synthetic":
        try:
            dim = int(cfg["dim"])
        except KeyError:
            raise ConfigError("[client.input] kind = 'synthetic' needs `dim`") from None
        seed = int(cfg.get("seed", client_id))
        scale = float(cfg.get("scale", 1.0))
        return lambda r: synthetic_update(dim, seed, r, scale)
    raise ConfigError(f"[client.input] kind must be 'npy' or 'synthetic', got {kind!r}")


def synthetic_update(dim: int, seed: int, round_: int, scale: float = 1.0) -> np.ndarray:
    """A reproducible test vector (not secret; for trials, tests and benchmarks only)."""
    return np.random.default_rng([seed, round_]).normal(0.0, scale, dim).astype(np.float32)
