"""Ledger: write-ahead budget enforcement and tamper evidence on a real SQLite file."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

import privacy
from privacy.accountant import epsilon_of_events
from privacy.events import dpfedavg_event, dpsgd_event
from privacy.ledger import Ledger, Spend
from secagg.errors import ConfigError, LedgerIntegrityError, PrivacyBudgetExceeded

EV = dpfedavg_event(noise_multiplier=1.0, client_sample_rate=0.05, rounds=1, clipping_norm=0.5)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A ledger with 2 released rounds and one reserved-but-never-committed round."""
    path = tmp_path_factory.mktemp("ledger") / "ledger.sqlite"
    with Ledger(path, budget_epsilon=5.0, delta=1e-5) as led:
        for r in range(1, 3):
            e = led.reserve(Spend(EV, round=r, participants=20))
            led.commit(e, participants=18)
        led.reserve(Spend(EV, round=3, participants=20))  # "crash" before release
    return path


def _copy(src, tmp_path, name="copy.sqlite"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    for suffix in ("-wal", "-shm"):
        if src.with_name(src.name + suffix).exists():
            shutil.copy(src.with_name(src.name + suffix), dst.with_name(dst.name + suffix))
    return dst


def _tamper(path, *sql):
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER IF EXISTS entries_no_update")
    conn.execute("DROP TRIGGER IF EXISTS entries_no_delete")
    for s in sql:
        conn.execute(s)
    conn.commit()
    conn.close()


def test_rows_and_cumulative_epsilon_match_accountants(filled):
    with Ledger.open(filled) as led:
        rows = led.rows()
        assert [r.round for r in rows] == [1, 2, 3]
        assert [r.status for r in rows] == ["released"] * 2 + ["reserved"]
        assert rows[0].participants == 20 and rows[0].released_participants == 18
        for i, r in enumerate(rows, start=1):
            for name in ("prv", "rdp"):
                assert r.epsilon[name] == pytest.approx(
                    epsilon_of_events([EV] * i, delta=1e-5, accountant=name), rel=1e-9)
            assert r.epsilon["prv"] < r.epsilon["rdp"]
            assert (r.sample_rate, r.noise_multiplier, r.clipping, r.steps, r.delta) == (
                0.05, 1.0, 0.5, 1, 1e-5)
        # the crashed round is counted (write-ahead: never under-count)
        assert led.spent()["prv"] == pytest.approx(
            privacy.epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=3, delta=1e-5))
        res = led.verify(recompute=True)
        assert res.entries == 5 and res.releases == 3
        assert led.level == "user"


def test_refuses_over_budget_and_writes_nothing(tmp_path):
    path = tmp_path / "l.sqlite"
    led = Ledger(path, budget_epsilon=1.0, delta=1e-5, accountant="rdp")
    big = dpfedavg_event(noise_multiplier=0.7, client_sample_rate=0.5, rounds=1)
    head_before = led.verify().head_hash
    with pytest.raises(PrivacyBudgetExceeded, match=r"round 1 refused: .* > budget 1"):
        led.reserve(Spend(big, round=1))
    assert led.rows() == [] and led.verify().head_hash == head_before
    # a smaller spend still fits, then the next one does not
    ok = dpsgd_event(noise_multiplier=4.0, sample_rate=0.01, steps=10)
    e = led.reserve(ok, round=1)
    assert e.status == "reserved" and e.epsilon["rdp"] <= 1.0
    assert led.check(big)["rdp"] > 1.0
    led.close()


def test_reopen_keeps_budget_and_refuses_changes(filled):
    with pytest.raises(ConfigError, match="budget never changes"):
        Ledger(filled, budget_epsilon=50.0, delta=1e-5)
    with pytest.raises(ConfigError, match="delta"):
        Ledger(filled, budget_epsilon=5.0, delta=1e-6)
    with Ledger(filled, budget_epsilon=5.0, delta=1e-5) as led:
        assert led.budget_epsilon == 5.0 and len(led.rows()) == 3


def test_missing_budget_and_bad_parameters(tmp_path):
    with pytest.raises(ConfigError, match="needs a privacy budget"):
        Ledger(tmp_path / "a.sqlite", budget_epsilon=None, delta=1e-5)
    with pytest.raises(ConfigError, match="budget_epsilon must be"):
        Ledger(tmp_path / "b.sqlite", budget_epsilon=-2, delta=1e-5)
    with pytest.raises(ConfigError, match="1/n"):
        Ledger(tmp_path / "c.sqlite", budget_epsilon=2, delta=0.01, dataset_size=1000)
    with pytest.raises(ConfigError, match="no ledger"):
        Ledger.open(tmp_path / "missing.sqlite")


def test_commit_twice_or_foreign_entry_refused(tmp_path, filled):
    path = _copy(filled, tmp_path)
    with Ledger.open(path) as led:
        crashed = led.rows()[-1]
        done = led.rows()[0]
        with pytest.raises(ConfigError, match="already closed"):
            led.commit(done)
        aborted = led.abort(crashed, note="not enough survivors")
        assert aborted.status == "aborted"
        # aborting does not refund
        assert led.spent()["prv"] == pytest.approx(crashed.epsilon["prv"])
        led.verify()


def test_sqlite_triggers_block_update_and_delete(tmp_path, filled):
    path = _copy(filled, tmp_path)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE entries SET noise_multiplier = 9 WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM entries WHERE seq = 2")
    conn.close()


@pytest.mark.parametrize(
    "sql,bad_row,match",
    [
        (["UPDATE entries SET noise_multiplier = 5.0 WHERE seq = 3"], 3, "edited"),
        (["UPDATE entries SET eps_prv = 0.01 WHERE seq = 5"], 5, "edited"),
        (["DELETE FROM entries WHERE seq = 2"], 2, "deleted"),
        (["DELETE FROM entries WHERE seq = 5"], 5, "deleted"),
        (["UPDATE meta SET value = '500.0' WHERE key = 'budget_epsilon'"], 1, "parameters"),
        (["INSERT INTO entries SELECT 6, kind, ref, round, mechanism, level, participants, "
          "sample_rate, noise_multiplier, clipping, steps, delta, event, eps_prv, eps_pld, "
          "eps_rdp, note, created_at, prev_hash, row_hash FROM entries WHERE seq = 1"], 6, None),
    ],
)
def test_tampering_is_detected_at_first_bad_row(tmp_path, filled, sql, bad_row, match):
    path = _copy(filled, tmp_path)
    _tamper(path, *sql)
    with Ledger.open(path) as led:
        with pytest.raises(LedgerIntegrityError, match=match) as info:
            led.verify()
        assert info.value.row == bad_row
        assert f"row {bad_row}" in str(info.value)
        # a broken ledger refuses new reservations
        with pytest.raises(LedgerIntegrityError):
            led.reserve(Spend(EV, round=9))


def test_hmac_keyed_chain(tmp_path):
    key = b"k" * 32
    path = tmp_path / "keyed.sqlite"
    with Ledger(path, budget_epsilon=3.0, delta=1e-5, key=key) as led:
        led.commit(led.reserve(Spend(EV, round=1)))
        assert led.verify().keyed
    with Ledger.open(path, key=key) as led:
        led.verify()
    with Ledger.open(path, key=b"x" * 32) as led:
        with pytest.raises(LedgerIntegrityError, match="row 1"):
            led.verify()
    with pytest.raises(ConfigError, match="16 random bytes"):
        Ledger(tmp_path / "k2.sqlite", budget_epsilon=3.0, delta=1e-5, key=b"short")


def test_tracking_fewer_accountants(tmp_path):
    path = tmp_path / "fast.sqlite"
    with Ledger(path, budget_epsilon=3.0, delta=1e-5, accountant="rdp", track=("rdp",)) as led:
        e = led.reserve(Spend(EV, round=1))
        assert e.epsilon["rdp"] is not None and e.epsilon["prv"] is None and e.epsilon["pld"] is None
        assert set(led.spent()) == {"rdp"}
        led.verify(recompute=True)
    with Ledger.open(path) as led:
        assert led.track == ("rdp",)
    with pytest.raises(ConfigError, match="accountant must be one of"):
        Ledger(tmp_path / "x.sqlite", budget_epsilon=3.0, delta=1e-5, track=("moments",))


def test_concurrent_reservations_never_overdraw(tmp_path):
    # Two handles on one file (as two server processes would have) and several threads:
    # the check-then-append is atomic, so the budget is never exceeded.
    import threading

    path = tmp_path / "race.sqlite"
    budget = privacy.epsilon(noise_multiplier=1.0, sample_rate=0.05, steps=3, delta=1e-5,
                             accountant="rdp") + 1e-9  # exactly three rounds fit
    handles = [Ledger(path, budget_epsilon=budget, delta=1e-5, accountant="rdp", track=("rdp",))
               for _ in range(2)]
    refused, errors = [], []

    def worker(led, rnd):
        try:
            led.reserve(Spend(EV, round=rnd))
        except PrivacyBudgetExceeded:
            refused.append(rnd)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(handles[i % 2], i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(refused) == 3
    with Ledger.open(path) as led:
        assert len(led.rows()) == 3 and led.spent()["rdp"] <= budget
        led.verify(recompute=True)
    for h in handles:
        h.close()
