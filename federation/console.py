"""Terminal output for ``secagg run`` and ``secagg demo``: a rich progress bar with one line per
round, or JSON lines (``--json``) for machines. Nothing here changes what the engine does."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from federation.engine import SUMMARY_FILE, Federation, RoundResult, RunSummary


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def round_line(r: RoundResult, noun: str = "client", *, private: bool = True) -> str:
    parts = [f"round {r.round:>3}"]
    if r.metrics:  # a model scored by other figures than accuracy (the recommender's HR@10, ...)
        parts.extend(f"{name} {value:.4f}" for name, value in r.metrics.items())
    else:
        parts.append("acc   -   " if r.accuracy is None else f"acc {r.accuracy:.4f}")
    if private:
        parts.append(f"eps {r.epsilon:6.3f}")
    parts.append(f"up {_bytes(r.bytes_up_total):>8}")
    parts.append(f"{len(r.included)}/{len(r.sampled)} counted")
    drops = {stage: clients for stage, clients in sorted(r.dropped.items()) if clients}
    if sum(map(len, drops.values())) <= 2:
        for stage, clients in drops.items():
            parts.append(f"{noun} {', '.join(map(str, clients))} dropped at {stage}")
    elif drops:
        parts.append("dropped: " + ", ".join(f"{len(c)} at {s}" for s, c in drops.items()))
    if r.aborted:
        parts.append(f"ABORTED ({r.aborted})")
    return "  ".join(parts)


@contextmanager
def progress(fed: Federation, *, as_json: bool, noun: str = "client") -> Iterator[Callable[[RoundResult], None]]:
    """Yield an ``on_round`` callback that renders each finished round."""
    private = fed.accountant.is_private
    if as_json:
        def emit(r: RoundResult) -> None:
            print(json.dumps({"event": "round", **fed.round_json(r)}), flush=True)

        yield emit
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stdout)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("rounds", total=fed.config.rounds, status="")

        def emit(r: RoundResult) -> None:
            bar.console.print(round_line(r, noun, private=private), soft_wrap=True, highlight=False)
            acc = "" if r.accuracy is None else f"acc {r.accuracy:.3f}"
            eps = f" eps {r.epsilon:.2f}" if private else ""
            bar.update(task, completed=r.round, status=f"{acc}{eps} up {_bytes(r.bytes_up_total)}")

        yield emit


def print_summary(fed: Federation, summary: RunSummary, *, as_json: bool, noun: str = "client") -> None:
    c = fed.config
    out = summary.out_dir
    private = fed.accountant.is_private
    # One schema: --json prints the summary.json the run wrote, tagged as the summary event.
    data = {"event": "summary", **json.loads((out / SUMMARY_FILE).read_text())}
    if as_json:
        print(json.dumps(data), flush=True)
        return
    seen = {
        "none": f"every {noun}'s update in clear (no protection)",
        "masking": f"only the sum of the masked updates of the {noun}s that counted, never one {noun}'s update",
        "masking-sparse": f"only the sum of the masked updates (SecAgg+ sparse graph), never one {noun}'s update",
        "ckks": "only ciphertexts, and the decrypted sum released to it; it holds no secret key",
    }[c.protection]
    print()
    print(f"Finished {len(summary.rounds)} rounds of {c.name} ({c.num_clients} {noun}s, "
          f"{summary.num_params} parameters).")
    if summary.final_accuracy is not None:
        print(f"  Final test accuracy: {summary.final_accuracy:.4f}")
    final_metrics = next((r.metrics for r in reversed(summary.rounds) if r.metrics), None)
    if final_metrics:
        print("  Final test figures: " + ", ".join(f"{k} = {v:.4f}" for k, v in final_metrics.items()) + ".")
    print(f"  What the server saw: {seen}.")
    dropped = sorted({(s, cl) for r in summary.rounds for s, cls in r.dropped.items() for cl in cls})
    if dropped:
        print(f"  Dropouts handled by the protocol: {len(dropped)} "
              f"({', '.join(f'{noun} {cl} at {s}' for s, cl in dropped[:5])}{', ...' if len(dropped) > 5 else ''}).")
    print(f"  Uploaded in total: {_bytes(data['bytes_up_total'])}.")
    if private:
        budget = "" if c.budget_epsilon is None else f" of a budget of {c.budget_epsilon:g}"
        level = getattr(fed, "dp_unit", None) or (
            "record-level, per client (DP-SGD)" if c.dp == "dpsgd" else "user-level (DP-FedAvg)")
        print(f"  Privacy spent: epsilon = {data['epsilon']:.3f}{budget} at delta = {c.delta:g}, {level}.")
        print(f"  Privacy ledger (hash-chained, write-ahead): {data['ledger']}")
        print(f"  Privacy budget report (HTML): {data['report']}")
    print(f"  Metrics, checkpoint and config: {out}/")
