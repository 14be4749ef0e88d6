"""Certificate tooling: a CA, client certificates bound to Ed25519 protocol identities."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509

from federation.transport.certs import (
    Credentials,
    identity_from_cert,
    init_ca,
    issue,
    load_identity_key,
    verify_certificate,
)
from secagg.cli import main
from secagg.errors import ConfigError, InvalidSignature
from secagg.keys import IdentityKey


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    init_ca(d)
    return d


def test_client_certificate_binds_id_and_identity_key(ca):
    identity = IdentityKey.generate()
    bundle = issue(ca, client_id=7, identity=identity)
    cert = x509.load_pem_x509_certificate((bundle / "tls.pem").read_bytes())
    peer = identity_from_cert(cert)
    assert (peer.role, peer.client_id, peer.identity_public_key) == ("client", 7, identity.public_bytes)
    assert load_identity_key(bundle / "identity.key").public_bytes == identity.public_bytes
    assert verify_certificate((bundle / "tls.pem").read_bytes(), (ca / "ca.pem").read_bytes()) == peer
    creds = Credentials.load(bundle)
    assert creds.check_binding().client_id == 7


def test_private_keys_are_not_world_readable(ca):
    bundle = issue(ca, client_id=8)
    for name in ("tls.key", "identity.key"):
        assert stat.S_IMODE(os.stat(bundle / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600


def test_server_certificate_has_names_and_server_identity(ca):
    bundle = issue(ca, server=True, dns=("agg.example",), ips=("10.0.0.1",))
    cert = x509.load_pem_x509_certificate((bundle / "tls.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "agg.example" in san.get_values_for_type(x509.DNSName)
    assert identity_from_cert(cert).role == "server"


def test_certificate_from_another_ca_is_rejected(ca, tmp_path):
    other = tmp_path / "other"
    init_ca(other)
    bundle = issue(other, client_id=3)
    with pytest.raises(InvalidSignature):
        verify_certificate((bundle / "tls.pem").read_bytes(), (ca / "ca.pem").read_bytes())


def test_mismatched_identity_key_is_detected(ca, tmp_path):
    bundle = issue(ca, client_id=9, out=tmp_path / "c9")
    other = issue(ca, client_id=10, out=tmp_path / "c10")
    (bundle / "identity.key").write_bytes((other / "identity.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        Credentials.load(bundle).check_binding()


@pytest.mark.parametrize("bad", [0, -1, 1 << 20])
def test_client_id_range(ca, bad):
    with pytest.raises(ConfigError):
        issue(ca, client_id=bad)


def test_refuses_to_overwrite(ca):
    with pytest.raises(ConfigError, match="exists"):
        init_ca(ca)
    issue(ca, client_id=11)
    with pytest.raises(ConfigError, match="already holds"):
        issue(ca, client_id=11)


def test_cli_init_issue_show(tmp_path, capsys):
    d = str(tmp_path / "certs")
    assert main(["certs", "init", "--dir", d]) == 0
    assert main(["certs", "issue", "--server", "--dir", d, "--dns", "localhost"]) == 0
    assert main(["certs", "issue", "4", "--dir", d]) == 0
    capsys.readouterr()
    assert main(["certs", "show", f"{d}/client-4/tls.pem"]) == 0
    out = capsys.readouterr().out
    key = load_identity_key(f"{d}/client-4/identity.key").public_bytes.hex()
    assert out.startswith("client 4") and key in out
    assert main(["certs", "issue", "4", "--dir", d]) == 1  # exists: a typed error, exit 1


def test_request_flow_keeps_private_keys_on_the_client(ca, tmp_path):
    from federation.transport.certs import issue_from_request, request

    csr = request(21, tmp_path / "host21")
    issued = issue_from_request(ca, 21, csr.read_bytes(), out=tmp_path / "from-ca")
    assert sorted(p.name for p in issued.iterdir()) == ["ca.pem", "tls.pem"]  # no private key
    for name in ("ca.pem", "tls.pem"):
        (tmp_path / "host21" / name).write_bytes((issued / name).read_bytes())
    peer = Credentials.load(tmp_path / "host21").check_binding()
    assert peer.client_id == 21
    assert verify_certificate((issued / "tls.pem").read_bytes(), (ca / "ca.pem").read_bytes()) == peer


def test_request_for_another_id_or_with_a_lifted_proof_is_refused(ca, tmp_path):
    from federation.transport.certs import issue_from_request, request

    csr = request(22, tmp_path / "a").read_bytes()
    with pytest.raises(ConfigError, match="not client 23"):
        issue_from_request(ca, 23, csr, out=tmp_path / "x")
    # a request that binds someone else's identity key cannot prove possession of it
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from federation.transport.certs import POP_OID

    victim = IdentityKey.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            f"secagg://client/24/ed25519/{victim.public_bytes.hex()}")]), critical=False)
        .add_extension(x509.UnrecognizedExtension(POP_OID, b"\0" * 64), critical=False)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(InvalidSignature):
        issue_from_request(ca, 24, forged.public_bytes(serialization.Encoding.PEM), out=tmp_path / "y")


def test_cli_request_then_issue(tmp_path, capsys):
    d = str(tmp_path / "certs")
    assert main(["certs", "init", "--dir", d]) == 0
    assert main(["certs", "request", "5", "--out", str(tmp_path / "h5")]) == 0
    assert main(["certs", "issue", "5", "--dir", d, "--csr", str(tmp_path / "h5" / "request.csr")]) == 0
    assert not (tmp_path / "certs" / "client-5" / "tls.key").exists()


def test_key_holder_role_is_issued_by_the_ca_only(ca, tmp_path, capsys):
    """`--role keyholder` marks a client certificate; a plain one, a request or a server cannot claim it."""
    from federation.transport.certs import KEYHOLDER_ROLE_URI, identity_from_pem, issue_from_request, request

    holder = identity_from_pem((issue(ca, client_id=31, role="keyholder") / "tls.pem").read_bytes())
    plain = identity_from_pem((issue(ca, client_id=32) / "tls.pem").read_bytes())
    assert holder.keyholder and holder.role == "client" and holder.client_id == 31
    assert not plain.keyholder
    with pytest.raises(ConfigError, match="server never holds keys"):
        issue(ca, server=True, role="keyholder", out=tmp_path / "srv")
    with pytest.raises(ConfigError, match="role must be"):
        issue(ca, client_id=33, role="admin")
    # a request cannot carry the role (the CA refuses any extra name); the CA grants it
    csr = request(34, tmp_path / "h34").read_bytes()
    granted = issue_from_request(ca, 34, csr, out=tmp_path / "k34", role="keyholder")
    assert identity_from_pem((granted / "tls.pem").read_bytes()).keyholder
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    asking = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(f"secagg://client/35/ed25519/{IdentityKey.generate().public_bytes.hex()}"),
            x509.UniformResourceIdentifier(KEYHOLDER_ROLE_URI)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ConfigError):
        issue_from_request(ca, 35, asking.public_bytes(serialization.Encoding.PEM), out=tmp_path / "k35")
    d = str(tmp_path / "certs")
    assert main(["certs", "init", "--dir", d]) == 0
    assert main(["certs", "issue", "7", "--dir", d, "--role", "keyholder"]) == 0
    capsys.readouterr()
    assert main(["certs", "show", f"{d}/client-7/tls.pem"]) == 0
    assert capsys.readouterr().out.startswith("client 7 (key holder)")
    assert KEYHOLDER_ROLE_URI == "secagg://role/keyholder"
