"""Every bad input gets a typed secagg error whose message names the problem; the CLI prints
one line and exits 1 (handled error), never a traceback.

Each row: what the caller passes, the exception class, a fragment of the message.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import secagg
from federation.config import ExperimentConfig
from secagg.cli import main
from secagg.errors import ConfigError, InputError

U = np.random.default_rng(0).uniform(-1, 1, (5, 8))

AGGREGATE_ROWS = [
    ("threshold > n", U, dict(threshold=6), ConfigError, "threshold=6 must be between 2 and the number of clients (5)"),
    ("threshold 0", U, dict(threshold=0), ConfigError, "threshold=0 must be between 2"),
    ("threshold -1", U, dict(threshold=-1), ConfigError, "threshold=-1 must be between 2"),
    ("threshold 2.5", U, dict(threshold=2.5), ConfigError, "threshold must be a whole number of clients, got 2.5"),
    ("threshold 1", U, dict(threshold=1), ConfigError, "threshold=1 must be between 2"),
    ("complex updates", U + 1j, {}, InputError, "updates are complex"),
    ("ragged lists (masking)", [[1.0, 2.0], [3.0]], {}, InputError, "ragged"),
    ("ragged lists (ckks)", [[1.0, 2.0], [3.0]], dict(protection="ckks"), InputError, "ragged"),
    ("threshold with ckks", U, dict(protection="ckks", threshold=3), ConfigError, "threshold is a masking option"),
    ("graph with ckks", U, dict(protection="ckks", graph="sparse"), ConfigError, "graph is a masking option"),
    ("misspelled keyword", U, dict(treshold=3), ConfigError, "unknown option 'treshold'; did you mean 'threshold'?"),
    ("misspelled keyword (ckks)", U, dict(protection="ckks", key_holder=2), ConfigError, "did you mean 'key_holders'?"),
    ("dropouts as a list", U, dict(dropouts=[1, 2]), ConfigError, "dropouts must map a stage name"),
    ("seed as text", U, dict(seed="abc"), ConfigError, "seed must be an integer"),
    ("negative weights", U, dict(weights=[1, -1, 1, 1, 1]), InputError, "weights must be finite and >= 0"),
    ("all-zero weights", U, dict(weights=[0] * 5), InputError, "weights are all zero"),
    ("unknown protection", U, dict(protection="paillier"), ConfigError, "unknown protection 'paillier'"),
]


@pytest.mark.parametrize(("updates", "kwargs", "error", "fragment"),
                         [row[1:] for row in AGGREGATE_ROWS], ids=[row[0] for row in AGGREGATE_ROWS])
def test_aggregate_rejects(updates, kwargs, error, fragment):
    with pytest.raises(error) as info:
        secagg.aggregate(updates, **kwargs)
    assert fragment in str(info.value)


TOML_ROWS = [
    ("a number as a string", '[privacy]\nnoise_multiplier = "1.5"\n',
     "option 'noise_multiplier' expects float, got the string '1.5'; write the value without quotes"),
    ("a misspelled section", "[trainig]\nrounds = 3\n", "unknown section [trainig] (did you mean [training]?)"),
    ("a key in the wrong section", "[training]\ndp = 'dpsgd'\n", "unknown key 'dp' in [training] (it belongs in [privacy])"),
    ("a misspelled key", "[training]\nrouns = 3\n", "unknown key 'rouns' in [training] (did you mean 'rounds'?)"),
    ("an unknown top-level option", "rouns = 3\n", "unknown option 'rouns' (did you mean 'rounds'?)"),
    ("a text seed", '[run]\nseed = "abc"\n', "option 'seed' expects int, got the string 'abc'"),
    ("dropouts as a number", "[faults]\ndropout_schedule = 3\n", "option 'dropout_schedule' expects"),
]


@pytest.mark.parametrize(("text", "fragment"), [row[1:] for row in TOML_ROWS], ids=[row[0] for row in TOML_ROWS])
def test_experiment_toml_rejects(tmp_path, capsys, text, fragment):
    path = tmp_path / "e.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_toml(path)
    assert fragment in str(info.value)
    assert main(["run", str(path)]) == 1  # the same through the CLI: one line, exit 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1


def _unrelated_sqlite(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE patients (id INTEGER, name TEXT)")
    conn.commit()
    conn.close()
    return path


CLI_ROWS = [
    ("report on a text file", lambda d: (d / "notes.txt").write_text("hello\n"),
     ["report", "{d}/notes.txt", "--json"], "is not a privacy ledger (not an SQLite file)"),
    ("report on another application's database", lambda d: _unrelated_sqlite(d / "app.db"),
     ["report", "{d}/app.db", "--json"], "is an SQLite file but not a privacy ledger"),
    ("verify another application's database", lambda d: _unrelated_sqlite(d / "app.db"),
     ["report", "{d}/app.db", "--verify"], "not a privacy ledger"),
    ("report on a missing file", None, ["report", "{d}/none.db", "--json"], "no ledger file at"),
    ("bench with a negative dropout", None,
     ["bench", "masking", "--clients", "5", "--dim", "10", "--dropout", "-0.5"], "--dropout is the fraction"),
    ("bench with an impossible dimension", None, ["bench", "masking", "--clients", "5", "--dim", "1e12"],
     "exceeds the largest update a client accepts"),
    ("bench with a fractional dimension", None, ["bench", "masking", "--clients", "5", "--dim", "2.5"],
     "--dim must be a whole number"),
    ("bench with one client", None, ["bench", "masking", "--clients", "1", "--dim", "10"], "--clients must be"),
    ("certs issue from a missing request", None, ["certs", "issue", "3", "--dir", "{d}/ca", "--csr", "{d}/request.csr"],
     "no certificate request at"),
    ("run a missing config", None, ["run", "{d}/missing.toml"], "does not exist"),
]


@pytest.mark.parametrize(("prepare", "argv", "fragment"), [row[1:] for row in CLI_ROWS], ids=[row[0] for row in CLI_ROWS])
def test_cli_prints_one_line_and_exits_1(tmp_path, capsys, prepare, argv, fragment):
    if prepare is not None:
        prepare(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main([a.format(d=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    # a read never modifies the file it was pointed at, nor leaves new files beside it
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_usage_errors_exit_2_and_version_and_module_entry_point():
    with pytest.raises(SystemExit) as info:
        main(["bench", "masking", "--no-such-flag"])
    assert info.value.code == 2
    out = subprocess.run([sys.executable, "-m", "secagg", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"secagg {secagg.__version__}"


def test_a_closed_pipe_is_not_an_error():
    """``secagg ... | head -1``: the reader leaves early; no BrokenPipeError, exit 0."""
    code = ("import os, sys\n"
            "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
            "from secagg.cli import main\n"
            "sys.exit(main(['bench', 'masking', '--clients', '3', '--dim', '10']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_extra_is_named_whatever_the_arguments(tmp_path, monkeypatch, capsys):
    """A command whose extra is not installed says which one, even when its flags follow."""
    import secagg.cli

    (tmp_path / "needs_grpc_cmd.py").write_text(
        "raise ImportError(\"`secagg join` needs grpcio: pip install 'secagg[grpc]'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(secagg.cli, "COMMANDS", [("join", "needs_grpc_cmd", "join a server")])
    for argv in (["join"], ["join", "--server", "h:1", "--config", "c.toml", "--app", "m:f"], ["join", "--help"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "pip install 'secagg[grpc]'" in err and "Traceback" not in err
