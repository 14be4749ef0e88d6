"""``secagg report LEDGER``: render (HTML/JSON) or verify a privacy-budget ledger.

    secagg report ledger.sqlite --out report.html
    secagg report ledger.sqlite --json
    secagg report ledger.sqlite --verify      # exit 1 and name the first bad row if broken
    secagg report ledger.db --verify --key-file ledger.key --expect-head 8:3f2a...

Privacy code (matplotlib, dp-accounting) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from secagg.errors import ConfigError


def register(subparsers: Any, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description=(
            "Render a privacy-budget ledger as a self-contained HTML page (--out) or JSON "
            "(--json), or check its hash chain (--verify: exit status 1 naming the first bad "
            "row when the ledger was edited, rows deleted or inserted)."
        ),
    )
    p.add_argument("ledger", help="path of the SQLite ledger")
    p.add_argument("--out", "-o", help="write the HTML report here (e.g. report.html)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--verify", action="store_true", help="only check the ledger's integrity")
    p.add_argument("--recompute", action="store_true",
                   help="with --verify, also recompute every cumulative epsilon from the events")
    p.add_argument("--key-file", help="file holding the ledger's HMAC key (keyed ledgers; mode 0600)")
    p.add_argument("--expect-head", metavar="COUNT:HASH",
                   help="the head recorded earlier (printed by report): --verify fails and the report "
                        "says so if the ledger's head differs (entries removed or rewritten, file replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from privacy import report
    from privacy.ledger import Ledger

    path = Path(args.ledger)
    if not path.is_file():
        raise ConfigError(f"no ledger file at {path}")
    from privacy.ledger_key import read_key

    key = read_key(args.key_file) if args.key_file else None
    if args.verify:
        ledger = Ledger.open(path, key=key)
        try:
            res = ledger.verify(recompute=args.recompute, expect_head=args.expect_head)
        finally:
            ledger.close()
        keyed = "HMAC-keyed, key checked" if res.keyed else "NOT keyed (anyone can rebuild it)"
        print(f"{path}: OK, {res.entries} entries ({res.releases} releases), hash chain intact, "
              f"{keyed}; head {res.head}"
              + ("" if args.expect_head else " (record it elsewhere; check it later with --expect-head)"))
        return 0
    if not args.out and not args.json:
        raise ConfigError("say what to produce: --out report.html, --json, or --verify")
    if args.out:
        out = report.render_html(path, args.out, key=key, expect_head=args.expect_head)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(report.dumps(report.report_json(path, key=key, expect_head=args.expect_head)))
    return 0
