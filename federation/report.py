"""The federation's HTML privacy-budget report: one self-contained file (inline SVG, no scripts).

It is rendered from the ledger (the source of truth for the spend) and the run's per-round
metrics; every value is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from federation.ledger import BudgetLedger

if TYPE_CHECKING:
    from federation.engine import RunSummary


def _svg_line(points: list[tuple[float, float]], *, budget: float | None, width: int = 560, height: int = 220) -> str:
    if not points:
        return ""
    xmax = max(x for x, _ in points) or 1
    ymax = max([y for _, y in points] + ([budget] if budget and budget != float("inf") else [])) or 1
    pad = 36

    def sx(x: float) -> float:
        return pad + (width - 2 * pad) * x / xmax

    def sy(y: float) -> float:
        return height - pad - (height - 2 * pad) * y / ymax

    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="cumulative epsilon per round">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
             f'<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{path}"/>',
             f'<text x="{width - pad}" y="{height - 8}" text-anchor="end" font-size="12">round {xmax:g}</text>',
             f'<text x="4" y="{pad - 8}" font-size="12">epsilon {ymax:.3g}</text>']
    if budget and budget != float("inf"):
        parts.append(f'<line x1="{pad}" y1="{sy(budget):.1f}" x2="{width - pad}" y2="{sy(budget):.1f}" '
                     f'stroke="#d73a49" stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{width - pad}" y="{sy(budget) - 4:.1f}" text-anchor="end" font-size="12" '
                     f'fill="#d73a49">budget {budget:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_report(ledger: BudgetLedger, summary: "RunSummary", out_path: str | Path) -> Path:
    """Write the HTML report for ``ledger`` and ``summary`` to ``out_path``; return the path."""
    esc = html.escape
    rows = ledger.rows
    reserves = {r["round"]: r for r in rows if r["kind"] == "reserve"}
    commits = {r["round"]: r for r in rows if r["kind"] == "commit"}
    metrics = {r.round: r for r in summary.rounds}
    budget = ledger.budget_epsilon
    spent = ledger.spent()
    mechanism = next(iter(reserves.values()))["mechanism"] if reserves else {}
    table = []
    for rnd in sorted(reserves):
        m = metrics.get(rnd)
        acc = "" if m is None or m.accuracy is None else f"{m.accuracy:.4f}"
        status = "committed" if rnd in commits else "reserved (round did not finish)"
        if m is not None and m.aborted:
            status = f"aborted: {m.aborted}"
        table.append(
            f"<tr><td>{rnd}</td><td>{reserves[rnd]['epsilon_total']:.4f}</td><td>{esc(acc)}</td>"
            f"<td>{'' if m is None else len(m.included)}</td>"
            f"<td>{'' if m is None else m.bytes_up_total}</td><td>{esc(status)}</td></tr>"
        )
    budget_text = "unlimited" if budget == float("inf") else f"{budget:g}"
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy budget report: {esc(summary.config.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:860px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
code{{background:#f4f4f4;padding:1px 4px}}</style></head><body>
<h1>Privacy budget report</h1>
<p>Experiment <code>{esc(summary.config.name)}</code>: {esc(summary.config.dataset)},
{summary.config.num_clients} clients, protection <code>{esc(summary.config.protection)}</code>,
DP mode <code>{esc(summary.config.dp)}</code>, accountant <code>{esc(str(mechanism.get("accountant", "")))}</code>.</p>
<p><strong>Spent: epsilon = {spent:.4f}</strong> at delta = {ledger.delta:g} (budget: {budget_text}).
Spend is reserved before each round runs (write-ahead); a reserved round counts as spent even if it
did not finish. Composition: {esc(str(mechanism.get("composition", "")))}.</p>
{_svg_line([(0.0, 0.0)] + [(float(r), v["epsilon_total"]) for r, v in sorted(reserves.items())], budget=budget)}
<h2>Rounds</h2>
<table><tr><th>round</th><th>cumulative epsilon</th><th>test accuracy</th><th>clients counted</th>
<th>bytes uploaded</th><th>status</th></tr>
{"".join(table)}
</table>
<h2>Ledger</h2>
<p>File <code>{esc(str(ledger.path))}</code>: {len(rows)} rows, hash chain verified
(last hash <code>{esc(rows[-1]["hash"][:16]) if rows else ""}</code>).</p>
<p>Mechanism of one round: <code>{esc(str(mechanism.get("events_per_round", "")))}</code></p>
</body></html>
"""
    out = Path(out_path)
    out.write_text(doc, encoding="utf-8")
    return out
