"""Append-only, hash-chained SQLite privacy ledger that refuses a release over budget.

Theory of operation
-------------------

The ledger is one chain of *entries*; each entry stores the hash of the previous entry
(``prev_hash``) and its own hash over every column (``row_hash``). Three kinds:

* ``reserve`` -- one per release: round, mechanism, unit of privacy, planned participants,
  sampling rate, noise multiplier, clipping norm, steps, delta, the serialised privacy
  event, and the *cumulative* epsilon after this release by each accountant (PRV, PLD,
  RDP). Written **before** the aggregate is released (write-ahead).
* ``commit`` -- the aggregate of a reserved release was released (actual participants).
* ``abort`` -- the round was abandoned; informational only.

Rules:

1. Write-ahead. :meth:`Ledger.reserve` checks the budget and appends the reservation in
   one SQLite ``BEGIN IMMEDIATE`` transaction (check, then commit); only then may the
   caller release the aggregate, and then call :meth:`Ledger.commit`. A crash between the
   two leaves a reservation without commit: it is counted. The ledger never refunds:
   reservations count whether committed, aborted or left open, so it never under-counts.
2. Refuse, don't overdraw. A reservation whose cumulative epsilon (by the enforcing
   accountant, PRV by default) would exceed ``budget_epsilon`` raises
   :class:`PrivacyBudgetExceeded` and writes nothing.
3. Append-only. SQLite triggers reject UPDATE and DELETE on entries; ``verify()`` detects
   any edit, insertion or deletion made behind the triggers' back: the chain starts from a
   genesis hash over the ledger's parameters (budget, delta, accountant), every entry's
   hash covers all its columns and the previous hash, and the head (entry count and last
   hash) is kept in ``meta`` so truncating the tail is detected too.
4. Keyed (the default in the federation engine): with a secret ``key`` (kept in its own
   file, see :mod:`privacy.ledger_key`) every hash is an HMAC-SHA256 and ``meta`` carries
   ``head_mac``, an HMAC over the ledger's parameters and its head. Without the key nobody can
   truncate the chain (and fix the head), rewrite it, or change the parameters unnoticed.
   Without a key the chain is only tamper-*evident* against someone who does not know the
   format. Either way, record the head (``count:hash``, printed by ``secagg report``)
   elsewhere and check it with ``verify(expect_head=...)``: that also catches a rollback to
   an older copy of the file.

Cumulative epsilon composes every reserved event (record- and user-level together give a
valid record-level bound; the report states the unit). Any epsilon can be recomputed from
the stored events alone (``recompute=True`` in :meth:`Ledger.verify`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy._checks import check_delta, check_epsilon, check_positive_int
from privacy.accountant import ACCOUNTANTS, check_accountant, epsilon_of_events
from privacy.events import (
    DistributedDiscreteGaussianEvent,
    Level,
    PrivacyEvent,
    SampledGaussianEvent,
    event_from_dict,
)
from secagg.errors import (
    ConfigError,
    LedgerIntegrityError,
    PrivacyBudgetExceeded,
    PrivacyError,
)

SCHEMA_VERSION = 1
GENESIS_LABEL = b"secagg/v1/privacy-ledger|"
HEAD_LABEL = b"secagg/v1/privacy-ledger-head|"
#: Starts the note of every release whose noise and sampling came from a public seed.
DETERMINISTIC_NOTE = "INSECURE DETERMINISTIC RUN (noise and sampling derived from the public seed; no privacy):"
_PARAM_KEYS = ("schema_version", "budget_epsilon", "delta", "accountant", "track", "created_at", "keyed")

_ENTRY_COLUMNS = (
    "seq", "kind", "ref", "round", "mechanism", "level", "participants", "sample_rate",
    "noise_multiplier", "clipping", "steps", "delta", "event", "eps_prv", "eps_pld",
    "eps_rdp", "note", "created_at", "prev_hash",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('reserve', 'commit', 'abort')),
    ref INTEGER,
    round INTEGER,
    mechanism TEXT,
    level TEXT,
    participants INTEGER,
    sample_rate REAL,
    noise_multiplier REAL,
    clipping REAL,
    steps INTEGER,
    delta REAL,
    event TEXT,
    eps_prv REAL,
    eps_pld REAL,
    eps_rdp REAL,
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
"""


@dataclass(frozen=True)
class Spend:
    """A planned release: the privacy event plus what the report needs to explain it."""

    event: PrivacyEvent
    round: int
    participants: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.event, (SampledGaussianEvent, DistributedDiscreteGaussianEvent)):
            raise ConfigError(f"Spend.event must be a privacy event (privacy.events), got {self.event!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ConfigError(f"round must be an integer >= 0, got {self.round!r}")
        if self.participants is not None:
            check_positive_int(self.participants, name="participants")


@dataclass(frozen=True)
class LedgerEntry:
    """One release (a ``reserve`` entry) and what happened to it."""

    seq: int
    round: int
    mechanism: str
    level: str
    participants: int | None
    sample_rate: float
    noise_multiplier: float
    clipping: float | None
    steps: int
    delta: float
    epsilon: dict[str, float | None]
    status: str  # "reserved" (not yet released, or crashed), "released", "aborted"
    created_at: str
    row_hash: str
    note: str = ""
    released_participants: int | None = None
    event: PrivacyEvent | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "seq", "round", "mechanism", "level", "participants", "released_participants",
            "sample_rate", "noise_multiplier", "clipping", "steps", "delta", "epsilon", "status",
            "created_at", "row_hash", "note")}
        return d


@dataclass(frozen=True)
class VerifyResult:
    entries: int
    releases: int
    head_hash: str
    keyed: bool
    genesis: str = ""

    @property
    def head(self) -> str:
        """``count:hash``: record it outside the ledger, check it with ``expect_head``."""
        return f"{self.entries}:{self.head_hash}"


def _canonical(values: dict[str, Any]) -> bytes:
    def norm(v: Any) -> Any:
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else str(v)
        return v

    return json.dumps({k: norm(values[k]) for k in _ENTRY_COLUMNS}, sort_keys=True,
                      separators=(",", ":")).encode()


def _check_ledger_file(path: Path) -> None:
    """Raise LedgerIntegrityError unless ``path`` is an SQLite file holding a ledger's tables.

    Checked through a read-only connection, so a text file or another application's database
    is reported and left exactly as it was (opening it read-write would switch it to WAL mode).
    """
    with open(path, "rb") as fh:
        magic = fh.read(16)
    if magic != b"SQLite format 3\x00":
        raise LedgerIntegrityError(f"{path} is not a privacy ledger (not an SQLite file); pass the "
                                   "ledger.db an experiment wrote")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise LedgerIntegrityError(f"{path} is not a privacy ledger ({exc})") from None
    finally:
        conn.close()
    if not {"meta", "entries"} <= tables:
        raise LedgerIntegrityError(f"{path} is an SQLite file but not a privacy ledger (it has no meta and "
                                   "entries tables); pass the ledger.db an experiment wrote")


class Ledger:
    """Budget-enforcing privacy ledger in one SQLite file.

    ``Ledger(path, budget_epsilon=3.0, delta=1e-5)`` creates the file or opens it (the
    stored budget and delta must then match); ``Ledger.open(path)`` opens an existing
    ledger with its stored parameters (for reports). ``accountant`` enforces the budget;
    ``track`` lists the accountants whose cumulative epsilon is stored on every row
    (default all three; fewer is faster, e.g. ``track=("prv",)``). ``key`` (>= 16 random
    bytes) turns the hash chain into an HMAC chain.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        budget_epsilon: float | None,
        delta: float | None,
        accountant: str = "prv",
        track: tuple[str, ...] | None = None,
        key: bytes | None = None,
        dataset_size: int | None = None,
        _must_exist: bool = False,
    ) -> None:
        self.path = Path(path)
        self._key = key
        if key is not None and (not isinstance(key, bytes) or len(key) < 16):
            raise ConfigError("key must be at least 16 random bytes (e.g. os.urandom(32)) or None")
        exists = self.path.exists() and self.path.stat().st_size > 0
        if _must_exist and not exists:
            raise ConfigError(f"no ledger at {self.path}; create it with Ledger(path, budget_epsilon=..., delta=...)")
        if exists:
            _check_ledger_file(self.path)  # before any PRAGMA: a read must never modify another file
        # One connection, usable from several threads (e.g. a server's worker threads);
        # every access goes through self._lock. Other processes are serialised by SQLite's
        # BEGIN IMMEDIATE in _tx.
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            if exists:
                meta = self._meta()
                if not meta:
                    raise LedgerIntegrityError(f"{self.path} has no ledger parameters (meta table is empty)")
                self.budget_epsilon = float(meta["budget_epsilon"])
                self.delta = float(meta["delta"])
                self.accountant = meta["accountant"]
                self.track = tuple(meta.get("track", ",".join(ACCOUNTANTS)).split(","))
                if budget_epsilon is not None and float(budget_epsilon) != self.budget_epsilon:
                    raise ConfigError(
                        f"{self.path} was created with budget_epsilon={self.budget_epsilon}, not "
                        f"{budget_epsilon}; a ledger's budget never changes (start a new ledger)"
                    )
                if delta is not None and float(delta) != self.delta:
                    raise ConfigError(
                        f"{self.path} was created with delta={self.delta}, not {delta}"
                    )
            else:
                if budget_epsilon is None:
                    raise ConfigError(
                        "a new ledger needs a privacy budget: pass budget_epsilon=... (e.g. 3.0) "
                        "and delta=... (e.g. 1e-5)"
                    )
                if delta is None:
                    raise ConfigError("a new ledger needs delta=... (e.g. 1e-5, below 1/number of users)")
                self.budget_epsilon = check_epsilon(budget_epsilon, name="budget_epsilon")
                self.delta = check_delta(delta, dataset_size=dataset_size)
                self.accountant = check_accountant(accountant)
                track = tuple(ACCOUNTANTS if track is None else track)
                for name in track:
                    check_accountant(name)
                if self.accountant not in track:
                    track = (self.accountant, *track)
                self.track = tuple(n for n in ACCOUNTANTS if n in track)
                self._create()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(cls, path: str | Path, *, key: bytes | None = None) -> Ledger:
        return cls(path, budget_epsilon=None, delta=None, key=key, _must_exist=True)

    # -- plumbing ------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self) -> dict[str, str]:
        try:
            with self._lock:
                rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerIntegrityError(f"{self.path} is not a privacy ledger ({exc})") from exc
        return {r["key"]: r["value"] for r in rows}

    def _create(self) -> None:
        self._conn.executescript(_SCHEMA)
        with self._tx():
            created = _now()
            params = {
                "schema_version": str(SCHEMA_VERSION),
                "budget_epsilon": repr(self.budget_epsilon),
                "delta": repr(self.delta),
                "accountant": self.accountant,
                "track": ",".join(self.track),
                "created_at": created,
                "keyed": "1" if self._key else "0",
            }
            for k, v in params.items():
                self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (k, v))
            genesis = self._genesis(params)
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('head_count', '0')")
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('head_hash', ?)", (genesis,))
            if self._key:
                self._conn.execute("INSERT INTO meta (key, value) VALUES ('head_mac', ?)",
                                   (self._head_mac(params, 0, genesis),))

    def _tx(self):
        conn, lock = self._conn, self._lock

        class _Tx:
            def __enter__(self_inner):
                lock.acquire()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    lock.release()
                    raise

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    conn.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    lock.release()

        return _Tx()

    def _digest(self, data: bytes) -> str:
        if self._key:
            return hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    def _genesis(self, meta: dict[str, str]) -> str:
        fields = {k: meta.get(k) for k in _PARAM_KEYS}
        return self._digest(GENESIS_LABEL + json.dumps(fields, sort_keys=True).encode())

    def _head_mac(self, meta: dict[str, str], count: int, head_hash: str) -> str:
        """HMAC over the parameters and the head: truncation or a rebuilt chain needs the key."""
        fields = {k: meta.get(k) for k in _PARAM_KEYS}
        data = json.dumps({"params": fields, "count": count, "head": head_hash}, sort_keys=True)
        return hmac.new(self._key, HEAD_LABEL + data.encode(), hashlib.sha256).hexdigest()

    @property
    def keyed(self) -> bool:
        """Whether the ledger was created with a key (its ``meta`` says so)."""
        return self._meta().get("keyed") == "1"

    def _row_hash(self, values: dict[str, Any]) -> str:
        return self._digest(b"entry|" + _canonical(values))

    def _append(self, values: dict[str, Any]) -> dict[str, Any]:
        meta = self._meta()
        values = dict(values)
        values["seq"] = int(meta["head_count"]) + 1
        values["prev_hash"] = meta["head_hash"]
        values["created_at"] = _now()
        values.setdefault("note", "")
        for col in _ENTRY_COLUMNS:
            values.setdefault(col, None)
        values["row_hash"] = self._row_hash(values)
        cols = list(_ENTRY_COLUMNS) + ["row_hash"]
        self._conn.execute(
            f"INSERT INTO entries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [values[c] for c in cols],
        )
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'head_count'", (str(values["seq"]),))
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'head_hash'", (values["row_hash"],))
        if self._key:
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'head_mac'",
                               (self._head_mac(meta, values["seq"], values["row_hash"]),))
        return values

    def _raw_entries(self) -> list[sqlite3.Row]:
        try:
            with self._lock:
                return self._conn.execute("SELECT * FROM entries ORDER BY seq").fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerIntegrityError(f"{self.path}: cannot read entries ({exc})") from exc

    # -- integrity -----------------------------------------------------------------
    def verify(self, *, recompute: bool = False, expect_head: str | None = None) -> VerifyResult:
        """Check the whole chain; raise :class:`LedgerIntegrityError` at the first bad row.

        The error's ``row`` attribute holds the sequence number of the first bad entry.
        With ``recompute=True`` also recompute every cumulative epsilon from the events.
        ``expect_head`` (``count:hash`` or ``hash``, as recorded elsewhere earlier) must be the
        ledger's head now. A keyed ledger cannot be verified without its key (ConfigError).
        """
        meta = self._meta()
        for k in ("budget_epsilon", "delta", "accountant", "head_count", "head_hash"):
            if k not in meta:
                raise _integrity(f"ledger parameter {k!r} is missing from meta", 0)
        expected_meta = {*_PARAM_KEYS, "head_count", "head_hash"} | ({"head_mac"} if self._key else set())
        if meta.get("keyed") == "1" and not self._key:
            raise ConfigError(f"{self.path} is a keyed ledger: give its key (--key-file, or ledger_key "
                              "in the experiment config) to verify or extend it")
        if self._key and meta.get("keyed") != "1":
            raise _integrity("the ledger says it is not keyed, but it was opened with a key: it was "
                             "rebuilt without the key, or this is not the ledger the key belongs to", 0)
        if set(meta) != expected_meta:
            odd = sorted(set(meta) ^ expected_meta)
            raise _integrity(f"the ledger's parameters were changed (meta keys {odd})", 0)
        genesis = prev = self._genesis(meta)
        rows = self._raw_entries()
        expected_seq = 1
        releases = 0
        reserved: dict[int, sqlite3.Row] = {}
        events: list[PrivacyEvent] = []
        for row in rows:
            values = {c: row[c] for c in _ENTRY_COLUMNS}
            seq = row["seq"]
            if seq != expected_seq:
                raise _integrity(
                    f"row {expected_seq} is missing (next row found is {seq}): a row was deleted", expected_seq
                )
            if row["prev_hash"] != prev:
                which = "the ledger parameters (budget/delta) were changed" if seq == 1 else (
                    f"row {seq - 1} was deleted or replaced")
                raise _integrity(f"row {seq}: previous-hash link is broken ({which})", seq)
            if not hmac.compare_digest(self._row_hash(values), row["row_hash"]):
                raise _integrity(f"row {seq}: contents do not match its hash (the row was edited)", seq)
            if row["kind"] == "reserve":
                releases += 1
                reserved[seq] = row
                try:
                    ev = event_from_dict(json.loads(row["event"]))
                except (ConfigError, ValueError, TypeError, KeyError) as exc:
                    raise _integrity(f"row {seq}: stored event is unreadable ({exc})", seq) from exc
                cols = (ev.noise_multiplier, ev.sample_rate, ev.steps)
                if cols != (row["noise_multiplier"], row["sample_rate"], row["steps"]):
                    raise _integrity(f"row {seq}: columns disagree with the stored event", seq)
                events.append(ev)
                if recompute:
                    for name in ACCOUNTANTS:
                        stored = row[f"eps_{name}"]
                        if stored is None:
                            continue
                        fresh = epsilon_of_events(events, delta=row["delta"], accountant=name)
                        if not math.isclose(fresh, stored, rel_tol=1e-6, abs_tol=1e-9):
                            raise _integrity(
                                f"row {seq}: stored cumulative epsilon ({name}) {stored} does not "
                                f"match the recomputed {fresh}", seq)
            elif row["ref"] not in reserved:
                raise _integrity(f"row {seq}: {row['kind']} refers to unknown release {row['ref']}", seq)
            prev = row["row_hash"]
            expected_seq += 1
        count = int(meta["head_count"])
        if count != len(rows) or meta["head_hash"] != prev:
            first_missing = len(rows) + 1
            raise _integrity(
                f"the ledger head says {count} rows but {len(rows)} are present: "
                f"row {first_missing} onwards was deleted (or the head was edited)", first_missing
            )
        if self._key and not hmac.compare_digest(
                self._head_mac(meta, count, meta["head_hash"]), meta["head_mac"]):
            raise _integrity(
                f"the ledger head ({count} entries) or its parameters do not match their HMAC: row "
                f"{count + 1} onwards was removed, or the head or parameters edited, without the key",
                count + 1)
        result = VerifyResult(entries=len(rows), releases=releases, head_hash=prev, keyed=bool(self._key),
                              genesis=genesis)
        if expect_head is not None:
            want_count, _, want_hash = expect_head.strip().rpartition(":")
            if want_hash != prev or (want_count and want_count != str(len(rows))):
                raise _integrity(
                    f"the ledger head is {result.head}, not the expected {expect_head}: entries were "
                    "removed or rewritten, or the file was replaced by another (or older) ledger",
                    min(len(rows), int(want_count)) + 1 if want_count.isdigit() else 0)
        return result

    def head(self) -> tuple[int, str, str]:
        """(entry count, head hash, genesis hash) after a full :meth:`verify`."""
        res = self.verify()
        return res.entries, res.head_hash, res.genesis

    def contains_head(self, count: int, head_hash: str, genesis: str) -> bool:
        """True if this ledger (verified) is the one whose head once was ``count:head_hash``."""
        res = self.verify()
        if res.genesis != genesis or count > res.entries:
            return False
        if count == 0:
            return head_hash == genesis
        row = next((r for r in self._raw_entries() if r["seq"] == count), None)
        return row is not None and hmac.compare_digest(row["row_hash"], head_hash)

    # -- budget --------------------------------------------------------------------
    def _events(self) -> list[PrivacyEvent]:
        return [
            event_from_dict(json.loads(r["event"]))
            for r in self._raw_entries() if r["kind"] == "reserve"
        ]

    def _cumulative(
        self, events: list[PrivacyEvent], known: dict[str, float] | None = None
    ) -> dict[str, float | None]:
        out: dict[str, float | None] = {n: None for n in ACCOUNTANTS}
        out.update(known or {})
        for name in self.track:
            if out[name] is not None:
                continue
            try:
                out[name] = epsilon_of_events(events, delta=self.delta, accountant=name)
            except PrivacyError:
                if name == self.accountant:
                    raise
                out[name] = None  # this accountant could not bound it; the others did
        return out

    def check(self, spend: Spend | PrivacyEvent) -> dict[str, float | None]:
        """Cumulative epsilon by each accountant *if* ``spend`` were reserved (no write)."""
        event = spend.event if isinstance(spend, Spend) else self._as_spend(spend, round=0).event
        return self._cumulative(self._events() + [event])

    def reserve(
        self, spend: Spend | PrivacyEvent, *, round: int | None = None,
        participants: int | None = None, note: str = "",
    ) -> LedgerEntry:
        """Check the budget and record the planned spend BEFORE the release (write-ahead).

        Raises :class:`PrivacyBudgetExceeded` (and writes nothing) if the cumulative
        epsilon by the enforcing accountant would exceed the budget, and
        :class:`LedgerIntegrityError` if the chain is already broken.
        """
        spend = self._as_spend(spend, round=round, participants=participants, note=note)
        with self._tx():
            self.verify()
            events = self._events() + [spend.event]
            enforced = epsilon_of_events(events, delta=self.delta, accountant=self.accountant)
            if not enforced <= self.budget_epsilon:
                spent = self.spent()[self.accountant]
                raise PrivacyBudgetExceeded(
                    f"round {spend.round} refused: cumulative epsilon would be {enforced:.4g} "
                    f"({self.accountant}, delta={self.delta:g}) > budget {self.budget_epsilon:g} "
                    f"(already spent {spent:.4g}); raise the noise multiplier, sample fewer "
                    f"clients/records or stop training"
                )
            eps = self._cumulative(events, known={self.accountant: enforced})
            ev = spend.event
            values = self._append({
                "kind": "reserve", "ref": None, "round": spend.round,
                "mechanism": ev.mechanism.value, "level": ev.level.value,
                "participants": spend.participants, "sample_rate": ev.sample_rate,
                "noise_multiplier": ev.noise_multiplier, "clipping": ev.clipping_norm,
                "steps": ev.steps, "delta": self.delta,
                "event": json.dumps(ev.to_dict(), sort_keys=True),
                "eps_prv": eps["prv"], "eps_pld": eps["pld"], "eps_rdp": eps["rdp"],
                "note": spend.note,
            })
        return self._entry(values, status="reserved")

    def commit(self, entry: LedgerEntry, *, participants: int | None = None, note: str = "") -> LedgerEntry:
        """Mark a reserved release as released (after the aggregate went out)."""
        return self._close_entry(entry, "commit", participants, note)

    def abort(self, entry: LedgerEntry, *, note: str = "") -> LedgerEntry:
        """Record that a reserved round was abandoned. Its spend still counts (no refunds)."""
        return self._close_entry(entry, "abort", None, note)

    def _close_entry(self, entry: LedgerEntry, kind: str, participants: int | None, note: str) -> LedgerEntry:
        if not isinstance(entry, LedgerEntry):
            raise ConfigError(f"expected the LedgerEntry returned by reserve(), got {entry!r}")
        if participants is not None:
            check_positive_int(participants, name="participants")
        with self._tx():
            self.verify()
            rows = self._raw_entries()
            target = next((r for r in rows if r["seq"] == entry.seq and r["kind"] == "reserve"), None)
            if target is None or target["row_hash"] != entry.row_hash:
                raise ConfigError(f"release {entry.seq} is not a reservation in {self.path}")
            if any(r["ref"] == entry.seq for r in rows):
                raise ConfigError(f"release {entry.seq} (round {entry.round}) is already closed")
            self._append({"kind": kind, "ref": entry.seq, "round": entry.round,
                          "participants": participants, "note": note})
        return next(r for r in self.rows() if r.seq == entry.seq)

    @staticmethod
    def _as_spend(spend: Any, *, round: int | None = None, participants: int | None = None,
                  note: str = "") -> Spend:
        if isinstance(spend, Spend):
            return spend
        if isinstance(spend, (SampledGaussianEvent, DistributedDiscreteGaussianEvent)):
            if round is None:
                raise ConfigError("reserve(event) needs round=...")
            return Spend(spend, round=round, participants=participants, note=note)
        raise ConfigError(f"expected a Spend or SampledGaussianEvent, got {type(spend).__name__}")

    # -- reading -------------------------------------------------------------------
    def _entry(self, values: Any, *, status: str, released: int | None = None) -> LedgerEntry:
        ev = event_from_dict(json.loads(values["event"]))
        return LedgerEntry(
            seq=values["seq"], round=values["round"], mechanism=values["mechanism"],
            level=values["level"], participants=values["participants"],
            sample_rate=values["sample_rate"], noise_multiplier=values["noise_multiplier"],
            clipping=values["clipping"], steps=values["steps"], delta=values["delta"],
            epsilon={n: values[f"eps_{n}"] for n in ACCOUNTANTS}, status=status,
            created_at=values["created_at"], row_hash=values["row_hash"], note=values["note"],
            released_participants=released, event=ev,
        )

    def rows(self) -> list[LedgerEntry]:
        """One :class:`LedgerEntry` per release, in order, with its status."""
        raw = self._raw_entries()
        closing = {r["ref"]: r for r in raw if r["kind"] != "reserve"}
        out = []
        for r in raw:
            if r["kind"] != "reserve":
                continue
            c = closing.get(r["seq"])
            status = "reserved" if c is None else ("released" if c["kind"] == "commit" else "aborted")
            out.append(self._entry(r, status=status, released=c["participants"] if c is not None else None))
        return out

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.rows())

    def spent(self) -> dict[str, float]:
        """Cumulative epsilon by each tracked accountant (as stored at the last reservation).

        NaN where an accountant could not bound the composition (e.g. PRV with very weak
        noise); the enforcing accountant always has a value.
        """
        rows = self.rows()
        if not rows:
            return {n: 0.0 for n in self.track}
        last = rows[-1].epsilon
        return {n: (last[n] if last[n] is not None else math.nan) for n in self.track}

    def remaining(self) -> float:
        """Budget left by the enforcing accountant."""
        return max(0.0, self.budget_epsilon - self.spent()[self.accountant])

    @property
    def level(self) -> str:
        """Unit of the guarantee: ``user`` if every release is user-level, else ``record``."""
        levels = {r.level for r in self.rows()}
        return Level.USER.value if levels == {Level.USER.value} else Level.RECORD.value


def _integrity(message: str, row: int) -> LedgerIntegrityError:
    err = LedgerIntegrityError(message)
    err.row = row  # type: ignore[attr-defined]
    return err


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
