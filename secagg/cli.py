"""The ``secagg`` command line (also ``python -m secagg``).

Each subcommand lives in its own module under ``secagg.commands`` and exposes
``register(subparsers)``; the module is imported lazily so that ``secagg --help`` works
with only the core installed, and a subcommand whose extra is missing says which extra
to install, whatever arguments follow it.

Exit status: 0 done; 1 a handled error (bad input, missing file, refused budget: one line on
stderr, no traceback); 2 wrong usage (unknown flag, missing argument, missing extra);
70 a bug in secagg (the traceback is printed: please report it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help). Modules are imported only to build their parser.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "secagg.commands.demo", "run the end-to-end demo (10 hospitals, DP-SGD + secure aggregation)"),
    ("run", "secagg.commands.run", "run a federated experiment from a TOML config"),
    ("bench", "secagg.commands.bench", "benchmark masking or CKKS aggregation against a plain sum"),
    ("plan", "secagg.commands.plan", "plan a privacy budget: epsilon for given noise, or noise for a target epsilon"),
    ("report", "secagg.commands.report", "render or verify a privacy-budget ledger (HTML/JSON)"),
    ("certs", "secagg.commands.certs", "create a CA and issue client/server certificates for mutual TLS"),
    ("serve", "secagg.commands.serve", "run an aggregation server over gRPC with mutual TLS"),
    ("join", "secagg.commands.join", "join a gRPC aggregation server as a client"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secagg",
        description=(
            "Secure aggregation for federated learning: pairwise masking (SecAgg / SecAgg+), "
            "CKKS homomorphic encryption, DP-SGD clients and a tamper-evident privacy ledger. "
            "Run `secagg COMMAND --help` for each command."
        ),
    )
    from secagg import __version__

    parser.add_argument("--version", action="version", version=f"secagg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable: dict[str, str] = {}  # commands whose extra is missing -> why
    parser.set_defaults(_unavailable_commands=unavailable)
    for name, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # an optional extra is missing, or the command is not built
            sub.add_parser(name, help=f"{help_text} [unavailable: {exc}]")
            unavailable[name] = str(exc)
            continue
        module.register(sub, name, help_text)
    return parser


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 70


def log_to_stderr(level: str) -> None:
    """Timestamped log lines on stderr (stdout carries the command's JSON lines)."""
    import logging

    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`secagg ... | head`): not an error. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("secagg: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    unavailable = parser.get_default("_unavailable_commands")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in unavailable:  # say what is missing before parsing flags the stub does not know
        print(f"secagg {command}: unavailable ({unavailable[command]}). "
              "Install the missing extra, e.g. `pip install secagg[dp,he,grpc,fl]`.", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    from secagg.errors import SecAggError

    try:
        return int(args.func(args) or 0)
    except SecAggError as exc:
        print(f"secagg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # a path the user gave (config, ledger, certificate) that cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"secagg {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        raise
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"secagg {args.command}: internal error (a bug in secagg, not in your input); please report "
              "it with the traceback above", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
