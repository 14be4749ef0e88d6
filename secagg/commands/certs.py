"""`secagg certs init|issue|request|revoke|show`: a small CA for mutual TLS between server and clients.

The client certificate binds the client id to its Ed25519 protocol identity key (see
``federation.transport.certs``), so the server refuses a client whose messages are signed
by any other key.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Create a certificate authority and issue certificates for `secagg serve` / "
            "`secagg join`. Each client certificate binds the client id to the client's "
            "Ed25519 protocol identity key (URI SAN secagg://client/<id>/ed25519/<hex>)."
        ),
    )
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    p_init = sub.add_parser("init", help="create a CA (ca.pem, ca.key) in --dir")
    p_init.add_argument("--dir", default="certs", help="CA directory (default: ./certs)")
    p_init.add_argument("--name", default="secagg CA", help="CA common name")
    p_init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    p_init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    p_init.set_defaults(func=_init)

    p_issue = sub.add_parser(
        "issue",
        help="issue a client certificate (CLIENT_ID) or the server certificate (--server)",
        description=(
            "Writes ca.pem, tls.pem, tls.key and identity.key into --out (default "
            "DIR/client-<id> or DIR/server). Hand that directory to the party over a "
            "confidential channel; ca.key never leaves the CA host."
        ),
    )
    p_issue.add_argument("client_id", nargs="?", type=int, metavar="CLIENT_ID", help="client id (integer)")
    p_issue.add_argument("--server", action="store_true", help="issue the server certificate")
    p_issue.add_argument("--dir", default="certs", help="CA directory (default: ./certs)")
    p_issue.add_argument("--out", default=None, help="output directory for the bundle")
    p_issue.add_argument(
        "--dns", action="append", default=None, help="server DNS name (repeatable; default localhost)"
    )
    p_issue.add_argument(
        "--ip", action="append", default=None, help="server IP address (repeatable; default 127.0.0.1)"
    )
    p_issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p_issue.add_argument(
        "--csr", default=None,
        help="issue from a client's request (`secagg certs request`): writes only tls.pem and ca.pem",
    )
    p_issue.add_argument(
        "--role", choices=("client", "keyholder"), default="client",
        help="client certificates: 'keyholder' lets this client hold the ckks round keys "
             "(clients still name the key holder they trust in their own config)",
    )
    p_issue.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    p_issue.set_defaults(func=_issue)

    p_req = sub.add_parser(
        "request",
        help="on a client host: create its keys and a certificate request for the CA",
        description=(
            "Writes tls.key and identity.key (kept on this host) and request.csr into --out. "
            "Send request.csr to the CA (`secagg certs issue CLIENT_ID --csr request.csr`) and put "
            "the tls.pem and ca.pem it returns next to the keys."
        ),
    )
    p_req.add_argument("client_id", type=int, metavar="CLIENT_ID")
    p_req.add_argument("--out", required=True, help="directory for the keys and request.csr")
    p_req.add_argument("--force", action="store_true", help="overwrite existing keys")
    p_req.set_defaults(func=_request)

    p_rev = sub.add_parser(
        "revoke",
        help="revoke the certificate of CLIENT_ID (or --cert) in the CA's revocation list",
        description=(
            "Adds the certificate to DIR/crl.pem, signed by the CA (and refreshes DIR/server/crl.pem "
            "if the server bundle is there). A running server re-reads the list when it changes: the "
            "certificate is refused at its next connection and dropped at the next round start. "
            "`certs issue ID --force` revokes the certificate it replaces in the same way."
        ),
    )
    p_rev.add_argument("client_id", nargs="?", type=int, metavar="CLIENT_ID",
                       help="revoke DIR/client-<id>/tls.pem")
    p_rev.add_argument("--cert", default=None, help="revoke this PEM certificate instead")
    p_rev.add_argument("--dir", default="certs", help="CA directory (default: ./certs)")
    p_rev.set_defaults(func=_revoke)

    p_show = sub.add_parser("show", help="print the protocol identity bound in a certificate")
    p_show.add_argument("cert", help="PEM certificate (e.g. certs/client-3/tls.pem)")
    p_show.set_defaults(func=_show)


def _init(args: argparse.Namespace) -> int:
    from federation.transport.certs import init_ca
    from privacy.ledger_key import create_key

    path = init_ca(args.dir, name=args.name, days=args.days, force=args.force)
    print(f"CA certificate: {path}\nCA key:         {path.parent / 'ca.key'} (keep it offline)")
    ledger_key = path.parent / "ledger.key"
    if not ledger_key.exists():
        create_key(ledger_key)
    print(f"ledger key:     {ledger_key} (mode 0600; the server's privacy ledger HMAC key: set "
          f"ledger_key = \"{ledger_key}\" in the experiment's [privacy] table)")
    return 0


def _request(args: argparse.Namespace) -> int:
    from federation.transport.certs import request

    path = request(args.client_id, args.out, force=args.force)
    print(f"keys in {path.parent} (keep them there); send {path} to the CA")
    return 0


def _issue(args: argparse.Namespace) -> int:
    from federation.transport.certs import issue, issue_from_request

    if args.csr is not None:
        from pathlib import Path

        if args.client_id is None or args.server:
            print("secagg certs issue --csr needs the CLIENT_ID the request is for", file=sys.stderr)
            return 2
        csr = Path(args.csr)
        if not csr.is_file():
            from secagg.errors import ConfigError

            raise ConfigError(f"no certificate request at {csr}; the client writes it with "
                              f"`secagg certs request {args.client_id} --out DIR` (DIR/request.csr)")
        target = issue_from_request(args.dir, args.client_id, csr.read_bytes(),
                                    out=args.out, days=args.days, force=args.force, role=args.role)
        print(f"issued client {args.client_id} certificate in {target} (tls.pem, ca.pem); send both back")
        return 0

    dns = tuple(args.dns) if args.dns else ("localhost",)
    ips = tuple(args.ip) if args.ip else ("127.0.0.1",)
    target = issue(
        args.dir, client_id=args.client_id, server=args.server, dns=dns, ips=ips,
        out=args.out, days=args.days, force=args.force, role=args.role,
    )
    what = "server" if args.server else f"client {args.client_id}" + (" (key holder)" if args.role == "keyholder" else "")
    print(f"issued {what} credentials in {target} (ca.pem, tls.pem, tls.key, identity.key)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from pathlib import Path

    from federation.transport.revocation import certificate_serial, revoke

    if (args.client_id is None) == (args.cert is None):
        print("secagg certs revoke needs a CLIENT_ID or --cert PATH (one of them)", file=sys.stderr)
        return 2
    cert = Path(args.cert) if args.cert else Path(args.dir) / f"client-{args.client_id}" / "tls.pem"
    if not cert.is_file():
        print(f"secagg certs revoke: no certificate at {cert}", file=sys.stderr)
        return 1
    pem = cert.read_bytes()
    path = revoke(args.dir, pem)
    print(f"revoked certificate serial {certificate_serial(pem):x} ({cert}); revocation list: {path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from federation.transport.certs import identity_from_pem

    peer = identity_from_pem(Path(args.cert).read_bytes())
    who = "server" if peer.role == "server" else f"client {peer.client_id}" + (" (key holder)" if peer.keyholder else "")
    sys.stdout.write(f"{who}\nsubject: {peer.subject}\ned25519: {peer.identity_public_key.hex()}\n")
    return 0
