"""The federation's privacy ledger: append-only, hash-chained, write-ahead.

Rules:

1. A round's spend is *reserved* (a ``reserve`` row with the cumulative epsilon after the round)
   before any client trains. A reservation counts as spent from then on, whether or not the
   round finishes: what crashed mid-round may already have been released.
2. After the aggregate is applied, a ``commit`` row records what happened (metrics, clients).
3. Reserving a round that already has a reservation is a no-op, so ``--resume`` after a crash
   re-runs the round under the reservation it already made and never spends twice.
4. A reservation that would take the cumulative epsilon over the budget raises
   :class:`PrivacyBudgetExceeded` and writes nothing.
5. Every row carries the SHA-256 of the previous row; :meth:`BudgetLedger.verify` recomputes the
   chain and raises :class:`LedgerIntegrityError` if a row was edited, inserted or removed.

Rows are JSON lines (no pickle); the file is fsync'ed after each append.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from secagg.errors import LedgerIntegrityError, PrivacyBudgetExceeded

GENESIS = "0" * 64


def _digest(row: dict) -> str:
    body = {k: v for k, v in row.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class BudgetLedger:
    """A write-ahead privacy ledger for one federation with a fixed (epsilon, delta) budget."""

    def __init__(self, path: str | Path, *, budget_epsilon: float, delta: float) -> None:
        self.path = Path(path)
        self.budget_epsilon = float(budget_epsilon)
        self.delta = float(delta)
        self._rows: list[dict] = []
        if self.path.exists():
            self._rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.verify()
            header = self._rows[0] if self._rows else None
            if header and (header["budget_epsilon"], header["delta"]) != (self.budget_epsilon, self.delta):
                raise LedgerIntegrityError(
                    f"{self.path} was opened with budget (epsilon={header['budget_epsilon']}, "
                    f"delta={header['delta']}); refusing to continue it with "
                    f"(epsilon={self.budget_epsilon}, delta={self.delta})"
                )
        if not self._rows:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"kind": "open", "budget_epsilon": self.budget_epsilon, "delta": self.delta})

    @property
    def rows(self) -> list[dict]:
        return [dict(r) for r in self._rows]

    def spent(self) -> float:
        """Cumulative epsilon reserved so far (reserved counts as spent)."""
        return max((r["epsilon_total"] for r in self._rows if r["kind"] == "reserve"), default=0.0)

    def reservation(self, round_number: int) -> dict | None:
        for r in self._rows:
            if r["kind"] == "reserve" and r["round"] == round_number:
                return dict(r)
        return None

    def check(self, epsilon_total: float) -> None:
        """Raise PrivacyBudgetExceeded if a cumulative ``epsilon_total`` would break the budget."""
        if epsilon_total > self.budget_epsilon + 1e-12:
            raise PrivacyBudgetExceeded(
                f"the round would bring epsilon to {epsilon_total:.4g} > budget {self.budget_epsilon:g} "
                f"(delta={self.delta:g}; already spent {self.spent():.4g}); lower the number of rounds, "
                "raise the noise multiplier, or start a new ledger with a new budget"
            )

    def reserve(self, round_number: int, epsilon_total: float, mechanism: dict) -> bool:
        """Record a round's planned spend before it runs. Returns False if it was already reserved."""
        if self.reservation(round_number) is not None:
            return False
        self.check(epsilon_total)
        self._append({"kind": "reserve", "round": round_number, "epsilon_total": float(epsilon_total),
                      "mechanism": mechanism})
        return True

    def commit(self, round_number: int, entry: dict) -> None:
        """Record what the round released, after the aggregate was applied."""
        if self.reservation(round_number) is None:
            raise LedgerIntegrityError(f"round {round_number} committed without a reservation")
        self._append({"kind": "commit", "round": round_number, **entry})

    def committed_rounds(self) -> list[int]:
        return [r["round"] for r in self._rows if r["kind"] == "commit"]

    def verify(self) -> None:
        """Recompute the hash chain; raise LedgerIntegrityError on the first broken link."""
        prev = GENESIS
        for i, row in enumerate(self._rows):
            if row.get("prev") != prev or row.get("hash") != _digest(row) or row.get("seq") != i:
                raise LedgerIntegrityError(f"{self.path}: row {i} does not match the hash chain")
            prev = row["hash"]

    def _append(self, row: dict) -> None:
        row = {"seq": len(self._rows), "time": time.time(), **row,
               "prev": self._rows[-1]["hash"] if self._rows else GENESIS}
        row["hash"] = _digest(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._rows.append(row)
