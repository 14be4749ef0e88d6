"""Reports (HTML/JSON) and the `secagg plan` / `secagg report` commands."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from privacy.events import dpfedavg_event, dpsgd_event
from privacy.ledger import Ledger, Spend
from privacy.report import render_html, report_json
from secagg.cli import main as cli_main

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "ledger.sqlite"
    with Ledger(path, budget_epsilon=4.0, delta=1e-5) as led:
        ev = dpfedavg_event(noise_multiplier=1.1, client_sample_rate=0.1, clipping_norm=0.7)
        for r in (1, 2):
            led.commit(led.reserve(Spend(ev, round=r, participants=12)), participants=11)
        led.reserve(Spend(dpsgd_event(noise_multiplier=1.0, sample_rate=0.01, steps=50), round=3,
                          note="<script>alert(1)</script>"))
    return path


@pytest.fixture
def tampered(tmp_path, ledger_path):
    dst = tmp_path / "tampered.sqlite"
    shutil.copy(ledger_path, dst)
    conn = sqlite3.connect(dst)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("UPDATE entries SET noise_multiplier = 3.0 WHERE seq = 3")
    conn.commit()
    conn.close()
    return dst


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.rows, self.scripts = {}, [], 0, 0
        self._table, self._in_body = None, False  # rows are counted in the releases table's body
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids[a["id"]] = tag
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self._table = a.get("id")
        if tag == "tbody":
            self._in_body = self._table == "releases"
        if tag == "tr" and self._in_body:
            self.rows += 1
        if tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table, self._in_body = None, False

    def handle_data(self, data):
        self.text.append(data)


def test_json_report_matches_ledger(ledger_path):
    data = report_json(ledger_path)
    with Ledger.open(ledger_path) as led:
        assert data["spent"] == led.spent()
        assert data["integrity"]["ok"] and data["integrity"]["head_hash"] == led.verify().head_hash
    assert data["releases"] == 3 and [r["status"] for r in data["rows"]] == [
        "released", "released", "reserved"]
    assert data["unit"] == "record"  # mixed record- and user-level releases
    assert data["fraction_used"] == pytest.approx(data["spent"]["prv"] / 4.0)
    assert set(data["mechanisms"]) == {"dp-fedavg", "dp-sgd"}
    assert any("McMahan" in a for a in data["assumptions"])
    json.dumps(data)  # serialisable


def test_html_report_is_self_contained(tmp_path, ledger_path):
    out = render_html(ledger_path, tmp_path / "r.html")
    text = out.read_text()
    p = _Collect()
    p.feed(text)
    assert {"integrity", "budget-summary", "epsilon-plot", "releases"} <= set(p.ids)
    assert p.rows == 3 and p.scripts == 0
    assert "<script>alert(1)</script>" not in text  # notes are escaped
    assert "http://" not in text and "https://" not in text  # nothing fetched from outside
    png = base64.b64decode(p.imgs[0].split(",", 1)[1])
    assert p.imgs[0].startswith("data:image/png;base64,") and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Integrity check passed" in text


def test_html_report_shows_broken_chain(tmp_path, tampered):
    text = render_html(tampered, tmp_path / "bad.html").read_text()
    assert "INTEGRITY CHECK FAILED" in text and "row 3" in text
    assert report_json(tampered)["integrity"]["first_bad_row"] == 3


def test_cli_report_verify(ledger_path, tampered, capsys):
    assert cli_main(["report", str(ledger_path), "--verify"]) == 0
    assert "hash chain intact" in capsys.readouterr().out
    assert cli_main(["report", str(tampered), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "row 3" in err and "edited" in err


def test_cli_report_outputs(tmp_path, ledger_path, capsys):
    out = tmp_path / "cli.html"
    assert cli_main(["report", str(ledger_path), "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["releases"] == 3 and out.read_text().startswith("<!DOCTYPE html>")
    assert cli_main(["report", str(tmp_path / "nope.sqlite"), "--json"]) == 1
    assert "no ledger file" in capsys.readouterr().err


def test_cli_plan(capsys):
    args = ["plan", "--noise-multiplier", "1.12", "--batch-size", "256", "--dataset-size", "60000",
            "--steps", "14062", "--delta", "1e-5", "--accountant", "rdp", "--json"]
    assert cli_main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["epsilon"]["rdp"] == pytest.approx(2.52, abs=0.01)
    assert cli_main(["plan", "--target-epsilon", "2.5186", "--sample-rate", str(256 / 60000),
                     "--steps", "14062", "--delta", "1e-5", "--accountant", "rdp", "--json"]) == 0
    sigma = json.loads(capsys.readouterr().out)["noise_multiplier"]["rdp"]
    assert sigma == pytest.approx(1.12, rel=2e-3)


@pytest.mark.parametrize("argv,match", [
    (["--sigma", "1", "--sample-rate", "1.5", "--steps", "10", "--delta", "1e-5"], "sample_rate"),
    (["--sigma", "-1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "noise_multiplier"),
    (["--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0.1", "-n", "100"], "1/n"),
    (["--sigma", "1", "--steps", "10", "--delta", "1e-5"], "missing sampling rate"),
    (["--sigma", "1", "--sample-rate", "0.1", "--delta", "1e-5"], "missing length"),
])
def test_cli_plan_bad_input(argv, match, capsys):
    assert cli_main(["plan", *argv]) == 1
    assert match in capsys.readouterr().err


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium) for the headless rendering check")
def test_report_renders_in_headless_chromium(tmp_path, ledger_path):
    import matplotlib.image as mpimg
    import numpy as np

    html = render_html(ledger_path, tmp_path / "r.html")
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=180, check=True).stdout
    p = _Collect()
    p.feed(dom)
    assert {"integrity", "epsilon-plot", "releases"} <= set(p.ids) and p.rows == 3
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,1800", html.as_uri()],
                   capture_output=True, timeout=180, check=True)
    img = mpimg.imread(shot)
    assert img.shape[0] == 1800 and img.shape[1] == 1200
    # the page painted something: many distinct colours (text, plot, table), not a blank page
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_compliance_report_of_a_run_in_headless_chromium(tmp_path):
    """What a privacy officer needs, as Chromium renders it: plain words, unit, per-site budgets,
    n and batch, delta < 1/n, run identity with the ledger head, keyed/anchored status, the
    threat model in three lines and a glossary; a deterministic run is flagged as insecure."""
    import warnings

    from federation.config import ExperimentConfig
    from federation.engine import Federation

    cfg = ExperimentConfig.from_dict(dict(
        dataset="breast_cancer", num_clients=4, clients_per_round=4, rounds=1, batch_size=16,
        protection="none", dp="dpsgd", noise_multiplier=1.5, budget_epsilon=20.0, accountant="rdp",
        out_dir=str(tmp_path / "run")))
    fed = Federation(cfg)
    fed.run()
    html_path = tmp_path / "run" / "privacy_report.html"
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True,
                         timeout=180, check=True).stdout
    p = _Collect()
    p.feed(dom)
    text = " ".join(" ".join(p.text).split())
    assert {"guarantee", "unit", "identity", "ledger-head", "delta-check", "sites", "threat-model",
            "glossary", "integrity"} <= set(p.ids)
    assert "deterministic" not in p.ids
    with Ledger.open(tmp_path / "run" / "ledger.db", key=fed.ledger_key()) as led:
        head = led.verify().head
    assert head in text and "HMAC-SHA256" in text and "key checked" in text
    assert "one patient's record" in text and "worst-case site" in text
    assert f"config {cfg.fingerprint()}" in text or cfg.fingerprint() in text
    assert "is below 1/n" in text and "Batch size 16" in text
    assert text.count("ε for one of its records") == 1 and p.rows == 1  # one release
    sites = dom[dom.index('id="sites"'):dom.index("</table>", dom.index('id="sites"'))]
    assert sites.count("<tr>") == 1 + 4  # header + one row per site
    assert dom.count("<li>", dom.index('id="threat-model"'), dom.index("</ul>", dom.index('id="threat-model"'))) == 3
    for term in ("PRV", "PLD", "RDP", "noise multiplier", "clipping", "delta"):
        assert term in dom[dom.index('id="glossary"'):]
    # a deterministic run says loudly that it gives no privacy
    import dataclasses

    det = dataclasses.replace(cfg, deterministic=True, out_dir=str(tmp_path / "det"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Federation(det).run()
    dom = subprocess.run(base + ["--dump-dom", (tmp_path / "det" / "privacy_report.html").as_uri()],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    q = _Collect()
    q.feed(dom)
    assert "deterministic" in q.ids and "NO privacy" in " ".join(q.text)
