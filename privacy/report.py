"""Privacy-budget reports from a ledger: self-contained HTML and JSON.

The HTML page is written for a compliance reader: budget used vs total, epsilon over
rounds for each accountant (matplotlib plots embedded as PNG data URIs, no network
access needed), the per-release table, the parameters, the assumptions in plain words
and the result of the ledger's integrity check. A broken chain is shown first, in red,
and the numbers are marked untrustworthy.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from privacy.accountant import ACCOUNTANTS
from privacy.ledger import Ledger
from secagg.errors import ConfigError, LedgerIntegrityError

ACCOUNTANT_LABELS = {
    "prv": "PRV (Gopi et al. 2021) - tight",
    "pld": "PLD (Google dp-accounting) - tight",
    "rdp": "RDP (Mironov 2017) - looser upper bound",
}

MECHANISM_TEXT = {
    "dp-sgd": (
        "DP-SGD (record level): each client trains with per-example gradient clipping and "
        "Gaussian noise (Abadi et al. 2016, Opacus). Each record is used in a step with "
        "probability equal to the sampling rate (Poisson sampling)."
    ),
    "dp-fedavg": (
        "DP-FedAvg (user level): each round samples every client with the given probability, "
        "clips each client's whole update to the clipping norm, and adds Gaussian noise to the "
        "sum (McMahan et al. 2018). Protects everything one client contributes."
    ),
    "distributed-dgauss": (
        "Distributed discrete Gaussian (user level): each client adds its share of integer "
        "noise before secure aggregation, sized so the sum keeps the target noise even if the "
        "configured number of clients drop out (Kairouz et al. 2021). Accounted as the Gaussian "
        "with the same concentrated-DP guarantee; the RDP figure is the proven bound, the "
        "PRV/PLD figures treat the noise as exactly Gaussian (an approximation)."
    ),
    "distributed-skellam": (
        "Distributed Skellam noise (user level): each client adds integer Skellam noise before "
        "secure aggregation (Agarwal et al. 2021). Accounted as the Gaussian whose Renyi DP "
        "dominates the Skellam bound on integer orders; the PRV/PLD figures treat the noise "
        "as exactly Gaussian (an approximation)."
    ),
}

GENERAL_ASSUMPTIONS = [
    (
        "Epsilon and delta bound how much anyone who sees all released aggregates can learn "
        "about one unit (a record or a user): with probability at least 1 - delta, their "
        "beliefs change by at most a factor e^epsilon."
    ),
    (
        "Every release recorded here is composed; a release counts from the moment it was "
        "reserved, whether it was finally released, aborted or interrupted by a crash. "
        "Nothing is ever refunded."
    ),
    (
        "The guarantee assumes the noise was drawn as recorded, the clipping was applied, and "
        "nothing else about the data (e.g. sample counts, metrics) was released outside this "
        "ledger."
    ),
    (
        "Records and users are counted under add/remove-one neighbouring datasets, as in the "
        "accounting libraries used (Opacus, Google dp-accounting)."
    ),
]


def _load(ledger_path: str | Path, key: bytes | None):
    path = Path(ledger_path)
    if not path.is_file():
        raise ConfigError(f"no ledger file at {path}")
    ledger = Ledger.open(path, key=key)
    integrity: dict[str, Any]
    try:
        res = ledger.verify()
        integrity = {"ok": True, "error": None, "first_bad_row": None,
                     "entries": res.entries, "head_hash": res.head_hash, "keyed": res.keyed}
    except LedgerIntegrityError as exc:
        integrity = {"ok": False, "error": str(exc), "first_bad_row": getattr(exc, "row", None),
                     "entries": None, "head_hash": None, "keyed": key is not None}
    return ledger, integrity


def report_json(ledger_path: str | Path, *, key: bytes | None = None) -> dict[str, Any]:
    """The report's content as plain JSON-serialisable data."""
    ledger, integrity = _load(ledger_path, key)
    try:
        rows = ledger.rows()
        spent = ledger.spent()
        mechanisms = sorted({r.mechanism for r in rows})
        return {
            "report": "secagg privacy budget",
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ledger": str(Path(ledger_path)),
            "budget_epsilon": ledger.budget_epsilon,
            "delta": ledger.delta,
            "enforcing_accountant": ledger.accountant,
            "unit": ledger.level,
            "spent": {n: (None if math.isnan(v) else v) for n, v in spent.items()},
            "tracked_accountants": list(ledger.track),
            "remaining": ledger.remaining(),
            "fraction_used": spent[ledger.accountant] / ledger.budget_epsilon,
            "releases": len(rows),
            "integrity": integrity,
            "mechanisms": mechanisms,
            "assumptions": GENERAL_ASSUMPTIONS + [MECHANISM_TEXT[m] for m in mechanisms
                                                  if m in MECHANISM_TEXT],
            "rows": [r.to_dict() for r in rows],
        }
    finally:
        ledger.close()


def _plot_png(data: dict[str, Any]) -> str:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    rows = data["rows"]
    x = list(range(1, len(rows) + 1))
    styles = {"prv": "-o", "pld": "--s", "rdp": ":^"}
    for name in ACCOUNTANTS:
        ys = [r["epsilon"].get(name) for r in rows]
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[name], markersize=3,
                    label=ACCOUNTANT_LABELS[name])
    ax.axhline(data["budget_epsilon"], color="crimson", linewidth=1.2,
               label=f"budget epsilon = {data['budget_epsilon']:g}")
    ax.set_xlabel("release (in ledger order)")
    ax.set_ylabel(f"cumulative epsilon (delta={data['delta']:g})")
    ax.set_title("Privacy spent over releases")
    ax.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def render_html(ledger_path: str | Path, out_path: str | Path, *, key: bytes | None = None) -> Path:
    """Write the self-contained HTML report for ``ledger_path`` to ``out_path``."""
    data = report_json(ledger_path, key=key)
    e = html.escape
    integ = data["integrity"]
    acc = data["enforcing_accountant"]
    used = data["spent"][acc]
    frac = min(1.0, max(0.0, data["fraction_used"]))
    if integ["ok"]:
        integ_html = (
            f'<div class="ok" id="integrity">Integrity check passed: {integ["entries"]} '
            f'ledger entries, hash chain intact. Head hash (record it elsewhere to detect '
            f'later rewriting): <code>{e(integ["head_hash"])}</code>'
            f'{" (HMAC-keyed chain)" if integ["keyed"] else ""}.</div>'
        )
    else:
        integ_html = (
            f'<div class="bad" id="integrity">INTEGRITY CHECK FAILED (first bad ledger entry: '
            f'row {e(str(integ["first_bad_row"]))}). {e(integ["error"])}. The ledger was '
            f'altered; the figures below cannot be trusted.</div>'
        )
    plot = _plot_png(data) if data["rows"] else None
    head = ("<tr><th>release</th><th>ledger entry</th><th>round</th><th>mechanism</th><th>unit</th><th>status</th>"
            "<th>participants</th><th>sampling rate</th><th>noise multiplier</th>"
            "<th>clipping</th><th>steps</th>"
            + "".join(f"<th>cumulative &epsilon; ({n.upper()})</th>" for n in ACCOUNTANTS)
            + "<th>recorded at (UTC)</th></tr>")
    body = []
    for i, r in enumerate(data["rows"], start=1):
        parts = r["participants"]
        if r["released_participants"] is not None:
            parts = f'{r["participants"] if r["participants"] is not None else "-"} &rarr; {r["released_participants"]}'
        body.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in [
                i, r["seq"], r["round"], _fmt(r["mechanism"]), _fmt(r["level"]),
                f'<span class="st-{e(r["status"])}">{e(r["status"])}</span>',
                parts if isinstance(parts, str) else _fmt(parts),
                _fmt(r["sample_rate"]), _fmt(r["noise_multiplier"]), _fmt(r["clipping"]),
                _fmt(r["steps"]),
                *[_fmt(r["epsilon"].get(n)) for n in ACCOUNTANTS],
                _fmt(r["created_at"]),
            ]) + "</tr>"
        )
    spent_items = "".join(
        f"<li>{e(ACCOUNTANT_LABELS[n])}: <b>{_fmt(data['spent'].get(n))}</b></li>"
        for n in ACCOUNTANTS if n in data["spent"]
    )
    assumptions = "".join(f"<li>{e(a)}</li>" for a in data["assumptions"])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Privacy budget report - {e(Path(data["ledger"]).name)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1300px; color: #222; line-height: 1.45; padding: 0 1em; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; }}
.ok {{ background: #e8f6ec; border: 1px solid #3a8f55; padding: .7em; border-radius: 4px; }}
.bad {{ background: #fdeaea; border: 2px solid #c0392b; padding: .7em; border-radius: 4px;
        color: #8b1a10; font-weight: bold; }}
.bar {{ background: #eee; border-radius: 4px; height: 1.4em; width: 100%; max-width: 600px; }}
.fill {{ background: {"#c0392b" if frac > 0.9 else "#2e86c1"}; height: 100%;
         border-radius: 4px; width: {frac * 100:.1f}%; }}
table {{ border-collapse: collapse; font-size: .85em; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: .25em .45em; text-align: right; }}
th {{ background: #f3f3f3; }}
.scroll {{ overflow-x: auto; }}
td:nth-child(4), td:nth-child(5), td:nth-child(6) {{ text-align: left; }}
.st-reserved {{ color: #b9770e; }} .st-aborted {{ color: #7f8c8d; }} .st-released {{ color: #1e8449; }}
code {{ font-size: .85em; word-break: break-all; }}
</style></head>
<body>
<h1>Privacy budget report</h1>
<p>Ledger <code>{e(data["ledger"])}</code>, generated {e(data["generated_at"])}.</p>
{integ_html}
<h2>Budget</h2>
<p id="budget-summary">Used <b>{_fmt(used)}</b> of the total budget <b>&epsilon; = {_fmt(data["budget_epsilon"])}</b>
(&delta; = {_fmt(data["delta"])}, enforced with the {e(acc.upper())} accountant):
{frac * 100:.1f}% used, {_fmt(data["remaining"])} left, over {data["releases"]} release(s).
Unit of privacy: <b>{e(data["unit"])}</b>.</p>
<div class="bar" role="img" aria-label="{frac * 100:.1f}% of the budget used"><div class="fill"></div></div>
<p>Epsilon spent so far by each accountant (all are valid upper bounds; the tight ones are smaller):</p>
<ul>{spent_items}</ul>
<h2>Epsilon over releases</h2>
{f'<img id="epsilon-plot" alt="cumulative epsilon per release for each accountant" src="{plot}">' if plot else "<p>No releases yet.</p>"}
<h2>Releases</h2>
<div class="scroll"><table id="releases"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>
<p>Status: <i>released</i> - the aggregate went out; <i>reserved</i> - spend recorded before
release, no release confirmed (in progress or interrupted; counted anyway); <i>aborted</i> -
abandoned (counted anyway).</p>
<h2>Parameters</h2>
<ul>
<li>Total budget: &epsilon; = {_fmt(data["budget_epsilon"])}, &delta; = {_fmt(data["delta"])}</li>
<li>Enforcing accountant: {e(ACCOUNTANT_LABELS[acc])}</li>
<li>Mechanisms used: {e(", ".join(data["mechanisms"]) or "none")}</li>
</ul>
<h2>Assumptions, in plain words</h2>
<ul>{assumptions}</ul>
</body></html>
"""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=True)
