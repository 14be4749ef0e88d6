"""TOML configuration of `secagg serve` and `secagg join` (see examples/server.toml, client.toml).

Relative paths in a config file are resolved against the file's directory, so a bundle
(config + credential directory) can be moved as one folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import tomllib

from federation.transport.grpc_client import ClientSettings
from federation.transport.grpc_server import ServerSettings
from secagg.errors import ConfigError

SERVER_KEYS = {f.name for f in dataclasses.fields(ServerSettings)}


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


def load_server_config(path: str | os.PathLike) -> ServerConfig:
    data, base = _load(path)
    table = dict(data.get("server", {}))
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
    if "modes" in table:
        table["modes"] = tuple(str(m) for m in table["modes"])
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


# --------------------------------------------------------------------------- server progress


def read_progress(state_dir: Path | None) -> int:
    """Number of the last round the server completed (-1 if none)."""
    if state_dir is None or not (state_dir / "progress.json").is_file():
        return -1
    try:
        return int(json.loads((state_dir / "progress.json").read_text())["completed"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{state_dir / 'progress.json'} is corrupt; inspect it or start a fresh state_dir") from None


def record_round(state_dir: Path, number: int, total: np.ndarray, summary: dict) -> None:
    """Persist a completed round atomically: aggregate, summary, then the progress marker."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".round-{number}.npy"
    with tmp.open("wb") as f:
        np.save(f, total, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / f"round-{number}.npy")
    with (state_dir / "rounds.jsonl").open("a") as f:
        f.write(json.dumps(summary) + "\n")
    tmp = state_dir / ".progress.json"
    tmp.write_text(json.dumps({"completed": number}))
    os.replace(tmp, state_dir / "progress.json")


def record_failed_round(state_dir: Path, summary: dict) -> None:
    """Log a failed round in rounds.jsonl with its reason (no aggregate, and the progress marker does not move)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "rounds.jsonl").open("a") as f:
        f.write(json.dumps(summary) + "\n")
        f.flush()
        os.fsync(f.fileno())
