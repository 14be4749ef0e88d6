"""docs/deployment.md, sections 3.1, 3.2 and 3.6, walked in a temporary directory.

The commands are the documented ones, run through the CLI entry point; the config copy
is edited exactly as the guide says, and the paths it then names are checked.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from federation.transport.config import load_server_config
from federation.transport.revocation import RevocationList
from secagg.cli import main

REPO = Path(__file__).resolve().parents[1]
GUIDE = (REPO / "docs" / "deployment.md").read_text()


def test_certificates_config_copy_and_revocation_as_documented(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # 3.1 certificates
    assert main(["certs", "init", "--dir", "certs"]) == 0
    assert main(["certs", "issue", "--server", "--dir", "certs", "--dns", "localhost", "--ip", "127.0.0.1"]) == 0
    for cid in ("2", "3", "4", "5"):
        assert main(["certs", "issue", cid, "--dir", "certs"]) == 0
    assert main(["certs", "show", "certs/client-3/tls.pem"]) == 0
    assert capsys.readouterr().out.splitlines()[-3] == "client 3"

    # 3.2 server config: the copy as documented, edited as documented
    assert "cp examples/server.toml server.toml" in GUIDE
    assert 'credentials = "certs/server", state_dir = "server-state"' in GUIDE
    shutil.copy(REPO / "examples" / "server.toml", "server.toml")
    unedited = load_server_config("server.toml")
    assert unedited.credentials.resolve() == (tmp_path.parent / "certs" / "server").resolve()  # the trap
    text = Path("server.toml").read_text()
    text = re.sub(r'^credentials = "[^"]*"', 'credentials = "certs/server"', text, flags=re.M)
    text = re.sub(r'^state_dir = "[^"]*"', 'state_dir = "server-state"', text, flags=re.M)
    Path("server.toml").write_text(text)
    cfg = load_server_config("server.toml")
    assert cfg.credentials == tmp_path / "certs" / "server"
    assert cfg.state_dir == tmp_path / "server-state"
    assert cfg.settings.crl == str(tmp_path / "certs" / "server" / "crl.pem")

    # 3.6 revocation
    assert main(["certs", "revoke", "4", "--dir", "certs"]) == 0
    assert main(["certs", "issue", "2", "--dir", "certs", "--force"]) == 0  # retires the old client-2 certificate
    assert Path("certs/crl.pem").is_file() and Path("certs/server/crl.pem").is_file()
    listed = RevocationList(cfg.settings.crl, Path("certs/ca.pem").read_bytes())
    assert len(listed.serials) == 2
    assert not listed.is_revoked(Path("certs/client-2/tls.pem").read_bytes())  # the new one is good
    assert listed.is_revoked(Path("certs/client-4/tls.pem").read_bytes())
