"""Round ids a client has already taken part in, so a server cannot run the same round twice.

A client claims ``(its identity, the server's identity, round id)`` before it sends anything
signed in a round; a second claim raises :class:`~secagg.errors.ReplayError`. The store is
bounded: the oldest claims are forgotten once ``capacity`` is reached. Forgetting is safe
because every signature of a round also covers a digest of that round's fresh keys
(:func:`secagg.protocol.messages.consistency_payload`), so signatures of an old round never
verify in a new one; the store stops a client from *signing* in a repeated round.

:class:`MemoryRoundIds` lives as long as the process (the library default, one store shared
by every session of the process). :class:`FileRoundIds` keeps the claims in a file (one hex
line per claim, appended and fsynced before the claim returns) so they survive restarts;
``secagg join`` uses it with the path from client.toml.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from secagg.errors import ConfigError, ReplayError

DEFAULT_CAPACITY = 100_000


class RoundIdStore(Protocol):
    def claim(self, client_key: bytes, server_key: bytes, round_id: bytes) -> None:
        """Record the claim; raise :class:`ReplayError` if it was made before."""


def _key(client_key: bytes, server_key: bytes, round_id: bytes) -> bytes:
    return hashlib.sha256(b"secagg/v1/round-claim|" + client_key + server_key + round_id).digest()[:20]


class MemoryRoundIds:
    """Claims kept in memory, at most ``capacity`` of them (oldest forgotten first)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ConfigError("a round-id store needs a capacity of at least 1")
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, client_key: bytes, server_key: bytes, round_id: bytes) -> None:
        key = _key(client_key, server_key, round_id)
        with self._lock:
            if key in self._seen:
                raise ReplayError("this client already took part in a round with this id and server; refusing to sign again")
            self._seen[key] = None
            self._record(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)

    def _record(self, key: bytes) -> None:
        """Hook for persistent stores."""


class FileRoundIds(MemoryRoundIds):
    """Claims kept in ``path`` as well, reloaded on start; the file is rewritten when it doubles."""

    def __init__(self, path: str | os.PathLike, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(capacity)
        self.path = Path(path)
        self._lines = 0
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise ConfigError(f"cannot read the round-id store {self.path}: {exc}") from None
        for line in text.split():
            try:
                key = bytes.fromhex(line)
            except ValueError:
                raise ConfigError(f"{self.path} is not a round-id store (bad line {line[:40]!r})") from None
            self._seen[key] = None
            self._lines += 1
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def _record(self, key: bytes) -> None:
        if self._lines >= 2 * self.capacity:
            self._compact()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._lines += 1

    def _compact(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(k.hex() + "\n" for k in self._seen))
        os.replace(tmp, self.path)
        self._lines = len(self._seen)


_PROCESS_STORE = MemoryRoundIds()


def default_round_ids() -> MemoryRoundIds:
    """The process-wide in-memory store used when a client policy names none."""
    return _PROCESS_STORE
