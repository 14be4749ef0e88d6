"""The privacy ledger's HMAC key: 32 random bytes in a file of its own (mode 0600).

The key never lives in the ledger file: whoever can rewrite the ledger but not read the key
cannot forge a chain, a head or the ledger's parameters that verify under it. Keep the file
apart from the ledger (another directory, another user, a secrets store) where that matters;
the head hash the report prints, recorded elsewhere, also catches a rollback by someone who
holds the key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from secagg.errors import ConfigError

KEY_BYTES = 32


def create_key(path: str | Path) -> bytes:
    """Write a fresh key to ``path`` (refuses to overwrite one) with mode 0600; return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; a ledger key is never overwritten") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def read_key(path: str | Path) -> bytes:
    """The key in ``path``; refuses a file others can read or write, or one of the wrong size."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no ledger key at {path}: the ledger cannot be verified or extended "
                          "without the key it was created with (see ledger_key in the config)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} is readable or writable by other users (mode {mode:o}); "
                          f"run chmod 600 {path}")
    key = path.read_bytes()
    if len(key) < 16:
        raise ConfigError(f"{path} holds {len(key)} bytes; a ledger key has at least 16")
    return key


def load_or_create_key(path: str | Path) -> bytes:
    """The key in ``path``, created there first if the file does not exist."""
    return read_key(path) if Path(path).exists() else create_key(path)
