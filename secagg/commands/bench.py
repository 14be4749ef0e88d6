"""`secagg bench`: measured, not claimed -- every figure beside a plain sum from the same run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name, help=help_text,
        description="Benchmark a protection (masking or ckks) on synthetic updates. Prints one JSON object with --json, "
        "a table otherwise; --out also writes the JSON to a file (e.g. under benchmarks/results/).",
    )
    protections = parser.add_subparsers(dest="protection", metavar="PROTECTION", required=True)

    masking = protections.add_parser("masking", help="pairwise-masking secure aggregation (complete or SecAgg+ graph)",
                               description="One real masking round in process: keys, Shamir shares, AES-CTR masks, "
                               "signed consistency check, dropouts, unmasking.")
    masking.add_argument("--clients", type=int, default=100, help="number of clients (default 100)")
    masking.add_argument("--dim", type=float, default=1e6, help="parameters per update (default 1e6)")
    masking.add_argument("--dropout", type=float, default=0.1,
                         help="fraction of clients that never deliver their masked vector (default 0.1)")
    masking.add_argument("--graph", choices=["complete", "sparse"], default="complete",
                         help="complete graph (Bonawitz et al.) or sparse k-regular graph (SecAgg+)")
    masking.add_argument("--degree", type=int, default=None, help="sparse graph degree (default: chosen from n and dropout)")
    masking.add_argument("--bits", type=int, default=32, help="ring size 2^bits (8..32; default 32)")
    _common(masking)
    masking.set_defaults(func=_run_masking)

    ckks = protections.add_parser("ckks", help="CKKS homomorphic aggregation (TenSEAL)",
                            description="Clients encrypt under a public context, the server adds ciphertexts "
                            "without any secret key, the key holder decrypts only the sum.")
    try:
        from secagg.bench.ckks import add_ckks_arguments
    except ImportError as exc:
        reason = str(exc)  # `exc` is unbound once the except block ends
        ckks.set_defaults(func=lambda args: _unavailable("ckks", reason))
    else:
        add_ckks_arguments(ckks)
        _common(ckks)
        ckks.set_defaults(func=_run_ckks)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")


def _run_masking(args: argparse.Namespace) -> int:
    from secagg.bench.limits import check_bench_size
    from secagg.bench.masking import run_masking_bench

    check_bench_size(clients=args.clients, dim=args.dim, dropout=args.dropout)  # before saying it runs
    _progress(f"masking: {args.clients} clients x {args.dim:,.0f} parameters, {args.graph} graph, "
              f"{args.dropout:.0%} dropping: key agreement, shares, masking, unmasking ...")
    result = run_masking_bench(clients=args.clients, dim=args.dim, dropout=args.dropout,
                               graph=args.graph, bits=args.bits, degree=args.degree)
    return _emit(result, args)


def _run_ckks(args: argparse.Namespace) -> int:
    from secagg.bench.ckks import run_ckks_bench

    options = {k: v for k, v in vars(args).items()
               if k not in ("func", "command", "protection", "json", "out") and not k.startswith("_")}
    from secagg.bench.limits import check_bench_size

    check_bench_size(clients=args.clients, dim=args.dim)
    _progress(f"ckks: {args.clients} clients x {args.dim:,.0f} parameters: keys, encryption, sum, decryption ...")
    return _emit(run_ckks_bench(**options), args)


def _progress(line: str) -> None:
    """What is running, on stderr (stdout stays the result alone, for --json and pipes)."""
    print(f"secagg bench {line}", file=sys.stderr, flush=True)


def _unavailable(mode: str, reason: str) -> int:
    print(f"secagg bench {mode}: unavailable ({reason}); install the extra with `pip install secagg[he]`", file=sys.stderr)
    return 2


def _emit(result: dict, args: argparse.Namespace) -> int:
    text = json.dumps(result, indent=None if args.json else 2, sort_keys=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(text)
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = f"{value:.6g}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0
