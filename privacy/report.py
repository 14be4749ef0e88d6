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
from privacy.ledger import DETERMINISTIC_NOTE, Ledger
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
        "probability equal to the sampling rate (Poisson sampling). Noise and batches are drawn "
        "from the operating system's random source, with Opacus' defence against floating-point "
        "attacks (each noise value is a sum of four Gaussians)."
    ),
    "dp-fedavg": (
        "DP-FedAvg (user level): each round samples every client with the given probability "
        "(drawn from the operating system's random source at round time, never from a public "
        "seed; a sampling rate of 1 means every site took part and no amplification is claimed), "
        "clips each client's whole update to the clipping norm, and adds noise to the sum "
        "(McMahan et al. 2018): a discrete Gaussian on a fine grid, so the output's low-order "
        "bits leak nothing; the recorded noise multiplier allows for the grid. Protects "
        "everything one client contributes."
    ),
    "distributed-dgauss": (
        "Distributed discrete Gaussian (user level): each client adds its share of integer "
        "noise before secure aggregation, sized so the shares of the surviving clients that do "
        "not collude with the server (at most a third of the others are assumed to) carry the "
        "target noise even if the configured number of clients drop out (Kairouz, Liu & "
        "Steinke 2021). Only the RDP accountant has a proof for this mechanism; it enforces the "
        "budget, and PRV/PLD figures are not stated."
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


THREAT_MODEL = [
    ("Protected against: anyone who sees the released models or aggregates (other sites, the "
     "server operator, whoever receives the final model) learning whether one unit's data was "
     "used, beyond the epsilon and delta stated here."),
    ("Assumed: the server follows the protocol for noise and sampling (central noise), or at "
     "most a third of the other sites collude with it (distributed noise and masking); the "
     "code and the operating system's random source are not compromised."),
    ("Not protected: what a site's own infrastructure leaks, data released outside this "
     "ledger, and the ledger's own history against someone holding its key unless the head "
     "printed here was recorded elsewhere."),
]

GLOSSARY = [
    ("epsilon (ε)", "How much the output may depend on one unit's data: every outcome is at most "
     "e^ε times more (or less) likely with it than without it. Smaller is more private."),
    ("delta (δ)", "The small probability with which the epsilon bound may fail; it must be far "
     "below 1/n (n = number of units), or one unit could be exposed outright."),
    ("unit of privacy", "What is protected: a record (one patient at one site) or a user (one "
     "site with all its records)."),
    ("noise multiplier", "Noise standard deviation divided by the clipping norm: how much noise "
     "hides one unit's largest possible contribution."),
    ("clipping", "Every contribution (a record's gradient, or a site's update) is scaled down to "
     "a fixed maximum size, the clipping norm, so no unit can move the result more than that."),
    ("sampling rate (q)", "The probability that a unit takes part in one step or round; secret "
     "random sampling makes each step cost less privacy (amplification)."),
    ("RDP", "Rényi differential privacy (Mironov 2017): an accountant that is a proof for every "
     "mechanism used here, slightly pessimistic."),
    ("PLD", "Privacy loss distribution accounting (Google dp-accounting): tight for Gaussian noise."),
    ("PRV", "Privacy loss random variable accounting (Gopi et al. 2021): tight for Gaussian "
     "noise; its upper bound is reported."),
    ("ledger head", "The number of entries and the hash of the last one. Recorded elsewhere, it "
     "proves later that no entry was removed or rewritten."),
]


def _load(ledger_path: str | Path, key: bytes | None, expect_head: str | None = None):
    path = Path(ledger_path)
    if not path.is_file():
        raise ConfigError(f"no ledger file at {path}")
    ledger = Ledger.open(path, key=key)
    integrity: dict[str, Any]
    keyed = ledger.keyed
    try:
        res = ledger.verify(expect_head=expect_head)
        integrity = {"ok": True, "error": None, "first_bad_row": None,
                     "entries": res.entries, "head_hash": res.head_hash, "head": res.head,
                     "keyed": keyed, "key_checked": res.keyed, "anchored": expect_head is not None}
    except LedgerIntegrityError as exc:
        integrity = {"ok": False, "error": str(exc), "first_bad_row": getattr(exc, "row", None),
                     "entries": None, "head_hash": None, "head": None, "keyed": keyed,
                     "key_checked": key is not None, "anchored": False}
    except ConfigError as exc:  # a keyed ledger read without its key: not checked, not broken
        integrity = {"ok": None, "error": str(exc), "first_bad_row": None, "entries": None,
                     "head_hash": None, "head": None, "keyed": keyed, "key_checked": False,
                     "anchored": False}
    return ledger, integrity


def _plain_words(unit: str, eps: float, delta: float) -> str:
    who = ("one patient's record, at the site where it is hardest to hide (every site is "
           "bounded by this figure)" if unit == "record" else
           "one site taking part at all, with all of its records")
    factor = math.exp(eps) if eps < 700 else math.inf
    return (f"Whatever anyone learns from everything this run released, any conclusion about "
            f"{who} is at most {factor:.3g} times (e^ε, ε = {eps:.3g}) more or less likely than "
            f"if that data had not been used, except with probability δ = {delta:g}.")


def report_json(ledger_path: str | Path, *, key: bytes | None = None,
                context: dict[str, Any] | None = None, expect_head: str | None = None) -> dict[str, Any]:
    """The report's content as plain JSON-serialisable data.

    ``context`` (from the engine): run identity (config hash, code version), the unit's size n,
    batch size and per-site budgets; ``expect_head``: the head recorded elsewhere earlier.
    """
    ledger, integrity = _load(ledger_path, key, expect_head)
    try:
        rows = ledger.rows()
        spent = ledger.spent()
        mechanisms = sorted({r.mechanism for r in rows})
        context = dict(context or {})
        n = context.get("n")
        delta_check = None if not n else {"n": n, "one_over_n": 1.0 / n, "ok": ledger.delta < 1.0 / n}
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
            "guarantee": _plain_words(ledger.level, spent[ledger.accountant], ledger.delta),
            "deterministic": any(r.note.startswith(DETERMINISTIC_NOTE) for r in rows),
            "context": context,
            "delta_check": delta_check,
            "threat_model": THREAT_MODEL,
            "glossary": [{"term": t, "meaning": m} for t, m in GLOSSARY],
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


def _identity_html(data: dict[str, Any]) -> str:
    e = html.escape
    integ, ctx = data["integrity"], data["context"]
    if integ["keyed"]:
        keyed = ("yes: HMAC-SHA256 with a key kept outside the ledger file"
                 + ("" if integ["key_checked"] else " (NOT checked: the key was not given to this report)"))
    else:
        keyed = "NO: anyone who can write the file can rebuild a consistent chain"
    anchored = ("yes: the head matched the one recorded earlier" if integ.get("anchored") else
                "not by this report: record the head below outside this system (e.g. in the "
                "study file) and check it later with <code>secagg report LEDGER --verify "
                "--key-file KEY --expect-head HEAD</code>")
    items = [
        ("Configuration hash", e(str(ctx.get("config_hash", "see the notes of the releases below")))),
        ("Code version", e(str(ctx.get("code_version", "see the notes of the releases below")))),
        ("Ledger head", f'<code id="ledger-head">{e(str(integ.get("head") or "unknown"))}</code>'),
        ("Ledger keyed", keyed),
        ("Ledger anchored", anchored),
    ]
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in items)


def _sites_html(data: dict[str, Any]) -> str:
    e = html.escape
    ctx = data["context"]
    parts = []
    n, batch = ctx.get("n"), ctx.get("batch_size")
    unit = data["unit"]
    if n:
        noun = "records at the largest site" if unit == "record" else "sites"
        dc = data["delta_check"]
        mark = "below" if dc["ok"] else "NOT below"
        parts.append(f'<p id="delta-check">n = {n} {noun}; &delta; = {_fmt(data["delta"])} is {mark} '
                     f'1/n = {_fmt(dc["one_over_n"])}.'
                     + (f" Batch size {batch} (the sampling rate q is batch / records at each site)."
                        if batch and unit == "record" else "") + "</p>")
    sites = ctx.get("sites") or []
    if sites:
        rows = "".join(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                e(str(s["site"])), _fmt(s.get("records")), _fmt(s.get("sample_rate")),
                _fmt(s.get("steps_per_round")), _fmt(s.get("epsilon")))) + "</tr>"
            for s in sites)
        parts.append('<table id="sites"><thead><tr><th>site</th><th>records</th><th>sampling rate q</th>'
                     '<th>steps per round</th><th>&epsilon; for one of its records</th></tr></thead>'
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts) or "<p>No per-site figures were given with this ledger (render the report from the run to include them).</p>"


def render_html(ledger_path: str | Path, out_path: str | Path, *, key: bytes | None = None,
                context: dict[str, Any] | None = None, expect_head: str | None = None) -> Path:
    """Write the self-contained HTML report for ``ledger_path`` to ``out_path``."""
    data = report_json(ledger_path, key=key, context=context, expect_head=expect_head)
    e = html.escape
    integ = data["integrity"]
    acc = data["enforcing_accountant"]
    used = data["spent"][acc]
    frac = min(1.0, max(0.0, data["fraction_used"]))
    if integ["ok"]:
        integ_html = (
            f'<div class="ok" id="integrity">Integrity check passed: {integ["entries"]} '
            f'ledger entries, hash chain intact. Ledger head (record it elsewhere to detect '
            f'later rewriting): <code>{e(integ["head"])}</code>'
            f'{" (HMAC-keyed chain, key checked)" if integ["key_checked"] else ""}.</div>'
        )
    elif integ["ok"] is None:
        integ_html = (
            f'<div class="bad" id="integrity">Integrity NOT CHECKED: {e(integ["error"])}. The '
            f'figures below are as the file states them.</div>'
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
    threat = "".join(f"<li>{e(t)}</li>" for t in data["threat_model"])
    glossary = "".join(f"<dt>{e(g['term'])}</dt><dd>{e(g['meaning'])}</dd>" for g in data["glossary"])
    banner = ('<div class="bad" id="deterministic">INSECURE TEST RUN: the noise and sampling of '
              'these releases were derived from a public seed (deterministic mode). They give NO '
              'privacy, whatever the figures below say.</div>' if data["deterministic"] else "")
    unit_text = ("record: one patient's record; the figure is that of the worst-case site"
                 if data["unit"] == "record" else "user: one site with everything it holds")
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
{banner}
{integ_html}
<h2>What this means</h2>
<p id="guarantee">{e(data["guarantee"])}</p>
<p>Unit of privacy: <b id="unit">{e(unit_text)}</b>.</p>
<h2>Run identity</h2>
<table id="identity">{_identity_html(data)}</table>
<h2>Sites, n and batch</h2>
{_sites_html(data)}
<h2>Threat model</h2>
<ul id="threat-model">{threat}</ul>
<h2>Budget</h2>
<p id="budget-summary">Used <b>{_fmt(used)}</b> of the total budget <b>&epsilon; = {_fmt(data["budget_epsilon"])}</b>
(&delta; = {_fmt(data["delta"])}, enforced with the {e(acc.upper())} accountant):
{frac * 100:.1f}% used, {_fmt(data["remaining"])} left, over {data["releases"]} release(s).
Unit of privacy: <b>{e(data["unit"])}</b>.</p>
<div class="bar" role="img" aria-label="{frac * 100:.1f}% of the budget used"><div class="fill"></div></div>
<p>Epsilon spent so far by each accountant. The enforcing accountant's figure ({e(acc.upper())})
is the guarantee; the others are shown for comparison, and an accountant without a proof for a
mechanism used here shows "-":</p>
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
<h2>Glossary</h2>
<dl id="glossary">{glossary}</dl>
</body></html>
"""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=True)
