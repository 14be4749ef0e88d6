"""The dependency rules of ARCHITECTURE.md, checked on a fresh interpreter."""

import subprocess
import sys

import pytest


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_secagg_core_never_imports_torch_or_the_other_packages():
    loaded = _modules_after("import secagg, secagg.protocol, secagg.protocol.simulate, secagg.cli")
    assert "torch" not in loaded
    assert not any(m == "federation" or m.startswith("federation.") for m in loaded)
    assert not any(m == "privacy" or m.startswith("privacy.") for m in loaded)


def test_privacy_never_imports_federation():
    pytest.importorskip("torch")
    loaded = _modules_after("import privacy, privacy.ledger, privacy.distributed")
    assert not any(m == "federation" or m.startswith("federation.") for m in loaded)


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "secagg.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "run", "bench", "plan", "report", "certs", "serve", "join"):
        assert command in out
    assert "unavailable" not in out, out


@pytest.mark.parametrize("command", ["demo", "run", "bench", "plan", "report", "certs", "serve", "join"])
def test_every_subcommand_has_help(command):
    result = subprocess.run([sys.executable, "-m", "secagg.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: secagg " + command in result.stdout
