"""The ledger holds under its key: truncation, a rebuilt chain and edited parameters are caught;
the head can be checked against a copy kept elsewhere; a resumed run refuses a missing or
different ledger; a reservation covers exactly one release."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat

import pytest
import torch

from federation.config import ExperimentConfig
from federation.engine import Federation
from privacy.events import dpfedavg_event
from privacy.ledger import _ENTRY_COLUMNS, Ledger, Spend, _canonical
from privacy.ledger_key import create_key, read_key
from secagg.cli import main as cli_main
from secagg.errors import ConfigError, LedgerIntegrityError

torch.set_num_threads(1)
EV = dpfedavg_event(noise_multiplier=2.0, client_sample_rate=0.05)
KEY = os.urandom(32)


def keyed_ledger(path, rounds=4, budget=8.0):
    with Ledger(path, budget_epsilon=budget, delta=1e-5, accountant="rdp", track=("rdp",), key=KEY) as led:
        for r in range(1, rounds + 1):
            led.commit(led.reserve(Spend(EV, round=r)))
        return led.verify().head


def raw(path):
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("DROP TRIGGER entries_no_delete")
    return conn


def test_truncation_with_a_fixed_head_is_caught_under_the_key(tmp_path):
    """Before: deleting the last rows and fixing head_count/head_hash in meta passed --verify."""
    path = tmp_path / "l.db"
    keyed_ledger(path)
    conn = raw(path)
    conn.execute("DELETE FROM entries WHERE seq > 4")
    last = conn.execute("SELECT row_hash FROM entries WHERE seq = 4").fetchone()[0]
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'head_count'")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head_hash'", (last,))
    conn.close()
    with Ledger.open(path, key=KEY) as led, pytest.raises(LedgerIntegrityError, match="HMAC") as info:
        led.verify()
    assert info.value.row == 5


def test_a_rebuilt_chain_is_caught_under_the_key(tmp_path):
    """Before: rewriting every row (noise x2, budget 8 -> 80) and rebuilding the chain passed."""
    path = tmp_path / "l.db"
    keyed_ledger(path)
    conn = raw(path)
    conn.row_factory = sqlite3.Row
    conn.execute("UPDATE meta SET value = '80.0' WHERE key = 'budget_epsilon'")
    conn.execute("UPDATE meta SET value = '0' WHERE key = 'keyed'")  # pretend it never had a key
    conn.execute("DELETE FROM meta WHERE key = 'head_mac'")
    meta = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
    fields = {k: meta.get(k) for k in ("schema_version", "budget_epsilon", "delta", "accountant",
                                       "track", "created_at", "keyed")}
    prev = hashlib.sha256(b"secagg/v1/privacy-ledger|" + json.dumps(fields, sort_keys=True).encode()).hexdigest()
    for row in conn.execute("SELECT * FROM entries ORDER BY seq").fetchall():
        values = {c: row[c] for c in _ENTRY_COLUMNS}
        values["prev_hash"] = prev
        if values["noise_multiplier"] is not None:
            values["noise_multiplier"] *= 2
            ev = json.loads(values["event"])
            ev["noise_multiplier"] *= 2
            values["event"] = json.dumps(ev, sort_keys=True)
        h = hashlib.sha256(b"entry|" + _canonical(values)).hexdigest()
        conn.execute("UPDATE entries SET noise_multiplier = ?, event = ?, prev_hash = ?, row_hash = ? "
                     "WHERE seq = ?", (values["noise_multiplier"], values["event"], prev, h, row["seq"]))
        prev = h
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head_hash'", (prev,))
    conn.close()
    with Ledger.open(path) as led:
        led.verify()  # consistent as an unkeyed ledger: this is what a keyless reader sees
    with Ledger.open(path, key=KEY) as led, pytest.raises(LedgerIntegrityError, match="not keyed"):
        led.verify()


def test_a_keyed_ledger_needs_its_key_to_verify_or_extend(tmp_path):
    path = tmp_path / "l.db"
    keyed_ledger(path, rounds=1)
    with Ledger.open(path) as led:
        with pytest.raises(ConfigError, match="keyed ledger"):
            led.verify()
        with pytest.raises(ConfigError, match="keyed ledger"):
            led.reserve(Spend(EV, round=2))


def test_expect_head_catches_a_rollback(tmp_path, capsys):
    path = tmp_path / "l.db"
    keyed_ledger(path, rounds=2)
    old = path.read_bytes()
    head = keyed_ledger(path, rounds=2)  # two more releases
    (tmp_path / "key").write_bytes(KEY)
    os.chmod(tmp_path / "key", 0o600)
    argv = ["report", str(path), "--verify", "--key-file", str(tmp_path / "key")]
    assert cli_main([*argv, "--expect-head", head]) == 0
    assert head in capsys.readouterr().out
    path.write_bytes(old)  # an older copy of the file: valid under the key, but not the head
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"l.db{suffix}").unlink(missing_ok=True)
    assert cli_main([*argv, "--expect-head", head]) != 0
    assert "not the expected" in capsys.readouterr().err


def test_key_file_is_private_and_never_overwritten(tmp_path):
    path = tmp_path / "k" / "ledger.key"
    key = create_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key(path) == key
    with pytest.raises(ConfigError, match="never overwritten"):
        create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_key(path)


# ------------------------------------------------------------------ the engine

def cfg(tmp_path, **options) -> ExperimentConfig:
    base = dict(dataset="breast_cancer", num_clients=6, clients_per_round=6, rounds=2, batch_size=16,
                lr=0.1, protection="none", dp="user", update_clip=1.0, noise_multiplier=2.0,
                budget_epsilon=50.0, accountant="rdp", out_dir=str(tmp_path / "run"))
    base.update(options)
    return ExperimentConfig.from_dict(base)


def test_the_engine_keeps_a_keyed_ledger_and_binds_the_checkpoint_to_it(tmp_path):
    """Before: the product never created a keyed ledger; deleting ledger.db and resuming started from zero."""
    fed = Federation(cfg(tmp_path, rounds=1))
    fed.run()
    out = tmp_path / "run"
    assert stat.S_IMODE((out / "ledger.key").stat().st_mode) == 0o600
    with Ledger.open(out / "ledger.db", key=fed.ledger_key()) as led:
        assert led.keyed and led.verify().keyed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ledger_head"].startswith("2:")  # reserve + commit
    # a resumed run with the ledger deleted is refused
    moved = out / "ledger.db.moved"
    (out / "ledger.db").rename(moved)
    with pytest.raises(ConfigError, match="no privacy ledger"):
        Federation(cfg(tmp_path)).run(resume=True)
    # ... and so is one with another (fresh) ledger in its place
    with Ledger(out / "ledger.db", budget_epsilon=50.0, delta=1e-5, accountant="rdp", key=fed.ledger_key()):
        pass
    with pytest.raises(ConfigError, match="not the ledger the checkpoint"):
        Federation(cfg(tmp_path)).run(resume=True)


def test_a_crash_after_release_before_commit_gets_a_new_reservation(tmp_path, monkeypatch):
    """Before: the re-run reused the crashed round's reservation: more releases than reservations."""
    releases = []
    real_aggregate = Federation.aggregate

    def counting(self, *args, **kwargs):
        out = real_aggregate(self, *args, **kwargs)
        releases.append(out)
        return out

    monkeypatch.setattr(Federation, "aggregate", counting)
    real_commit = Ledger.commit
    crashed = []

    def crash_once(self, entry, **kwargs):
        if entry.round == 2 and not crashed:
            crashed.append(entry.seq)
            raise KeyboardInterrupt("killed after the release, before the commit")
        return real_commit(self, entry, **kwargs)

    monkeypatch.setattr(Ledger, "commit", crash_once)
    opts = dict(rounds=3, protection="masking", threshold=4)
    with pytest.raises(KeyboardInterrupt):
        Federation(cfg(tmp_path, **opts)).run()
    fed = Federation(cfg(tmp_path, **opts))
    fed.run(resume=True)
    with Ledger.open(tmp_path / "run" / "ledger.db", key=fed.ledger_key()) as led:
        rows = led.rows()
        led.verify(recompute=True)
    assert len(releases) == 4  # rounds 1, 2 (lost), 2 again, 3
    assert len(rows) == len(releases)  # one reservation per release
    assert [r.status for r in rows] == ["released", "aborted", "released", "released"]


def test_certs_init_creates_the_ledger_key(tmp_path, capsys):
    assert cli_main(["certs", "init", "--dir", str(tmp_path / "ca")]) == 0
    key = tmp_path / "ca" / "ledger.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(read_key(key)) == 32
    assert "ledger_key" in capsys.readouterr().out
    before = key.read_bytes()
    assert cli_main(["certs", "init", "--dir", str(tmp_path / "ca"), "--force"]) == 0
    assert key.read_bytes() == before  # never overwritten: the ledger stays verifiable
