"""The federation's HTML privacy-budget report: one self-contained file (inline SVG, no scripts).

It is rendered from the ledger (the source of truth for the spend) and the run's per-round
metrics; every value is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from privacy.ledger import Ledger

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


def render_report(ledger: Ledger, summary: "RunSummary", out_path: str | Path) -> Path:
    """Write the HTML report for ``ledger`` and ``summary`` to ``out_path``; return the path."""
    esc = html.escape
    entries = ledger.rows()
    metrics = {r.round: r for r in summary.rounds}
    budget = ledger.budget_epsilon
    acct = ledger.accountant
    spent = ledger.spent()
    head = ledger.verify()
    table = []
    for e in entries:
        m = metrics.get(e.round)
        acc = "" if m is None or m.accuracy is None else f"{m.accuracy:.4f}"
        status = {"released": "released", "aborted": "aborted (still counted)",
                  "reserved": "reserved, not finished (still counted)"}.get(e.status, e.status)
        eps = e.epsilon.get(acct)
        table.append(
            f"<tr><td>{e.round}</td><td>{esc(e.level)}</td><td>{e.sample_rate:.4g}</td>"
            f"<td>{e.noise_multiplier:g}</td><td>{e.steps}</td>"
            f"<td>{'' if eps is None else f'{eps:.4f}'}</td><td>{esc(acc)}</td>"
            f"<td>{'' if e.released_participants is None else e.released_participants}</td>"
            f"<td>{'' if m is None else m.bytes_up_total}</td><td>{esc(status)}</td></tr>"
        )
    points = [(0.0, 0.0)] + [(float(e.round), e.epsilon.get(acct) or 0.0) for e in entries]
    c = summary.config
    unit = "record (one patient / customer record)" if ledger.level == "record" else "user (one client's whole data)"
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy budget report: {esc(c.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
code{{background:#f4f4f4;padding:1px 4px}}</style></head><body>
<h1>Privacy budget report</h1>
<p>Experiment <code>{esc(c.name)}</code>: {esc(c.dataset)}, {c.num_clients} clients,
protection <code>{esc(c.protection)}</code>, DP mode <code>{esc(c.dp)}</code>.</p>
<p><strong>Spent: epsilon = {spent[acct]:.4f}</strong> ({esc(acct)} accountant) at delta = {ledger.delta:g},
budget {budget:g}, remaining {ledger.remaining():.4f}. Unit of privacy: {esc(unit)}.
Other accountants: {", ".join(f"{esc(k)} {v:.4f}" for k, v in spent.items() if k != acct and v == v)}.</p>
<p>Each round's spend is reserved in the ledger before the round runs (write-ahead); a reservation
counts as spent even if the round was aborted or never finished.</p>
{_svg_line(points, budget=budget)}
<h2>Releases</h2>
<table><tr><th>round</th><th>level</th><th>sampling rate</th><th>noise multiplier</th><th>steps</th>
<th>cumulative epsilon</th><th>test accuracy</th><th>clients counted</th><th>bytes uploaded</th><th>status</th></tr>
{"".join(table)}
</table>
<h2>Ledger</h2>
<p>File <code>{esc(str(ledger.path))}</code>: {head.entries} entries, {head.releases} releases,
hash chain verified; head hash <code>{esc(head.head_hash)}</code> (record it elsewhere to detect a rebuilt chain).</p>
</body></html>
"""
    out = Path(out_path)
    out.write_text(doc, encoding="utf-8")
    return out
