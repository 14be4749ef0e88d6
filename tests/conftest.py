"""Shared test fixtures: the mutual-TLS PKI (a CA, the server's and the clients' credentials).

Every gRPC, Flower and deployment test needs the same set-up: a certificate authority, the
server bundle and one bundle per client (``client-<id>``, key holders marked). It lives here
once. ``make_pki`` builds one in a directory the test chooses (its TOML files name bundles
relative to it); ``pki`` is one shared, read-only deployment for tests that only connect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest


def _make_pki(ca_dir: Path, clients: Iterable[int] = (1, 2, 3), *, keyholders: Iterable[int] = (),
              dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    from federation.transport.certs import init_ca, issue

    holders = set(keyholders)
    init_ca(ca_dir)
    issue(ca_dir, server=True, dns=dns, ips=ips)
    for cid in clients:
        issue(ca_dir, client_id=cid, role="keyholder" if cid in holders else "client")
    return ca_dir


@pytest.fixture
def make_pki() -> Callable[..., Path]:
    """``make_pki(ca_dir, clients=(1, 2, 3), keyholders=(), dns=..., ips=...) -> ca_dir``: a new CA in
    ``ca_dir`` with ``ca_dir/server`` and ``ca_dir/client-<id>`` bundles (needs the grpc extra's
    certificate code). The server certificate names ``dns`` and ``ips`` (default localhost)."""
    pytest.importorskip("grpc")
    return _make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """One deployment for the session, never modified: ``pki/ca`` holds the server and clients
    1..19 (client 1 may hold the CKKS keys); ``pki/evil`` is a second CA with its own client 1."""
    pytest.importorskip("grpc")
    root = tmp_path_factory.mktemp("pki")
    _make_pki(root / "ca", range(1, 20), keyholders=(1,))
    from federation.transport.certs import init_ca, issue

    init_ca(root / "evil")
    issue(root / "evil", client_id=1)
    return root
