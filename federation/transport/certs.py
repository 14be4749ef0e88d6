"""Certificates for mutual TLS, and the binding of a client's TLS identity to its protocol key.

Theory of operation
-------------------
One deployment has one certificate authority (CA). The CA signs

* a **server certificate** (EKU serverAuth, DNS/IP subject alternative names), and
* one **client certificate** per client (EKU clientAuth).

TLS keys are ECDSA P-256 (supported by every TLS stack gRPC links against). The protocol
identity of a party is a *separate* Ed25519 key (:class:`secagg.keys.IdentityKey`) that
signs every protocol message (:func:`secagg.wire.seal`). The CA binds the two by writing
the protocol identity into the client certificate as a URI subject alternative name::

    secagg://client/<client_id>/ed25519/<64 hex digits of the raw Ed25519 public key>

Because the CA signed that URI, a server that accepted the TLS handshake learns from the
peer certificate alone both *which client id* is on the connection and *which Ed25519
key* must have signed every message that claims that id. The server keeps no separate
key registry: a sealed message whose sender id differs from the certificate's id, or
whose signature does not verify under the certificate's key, is refused (identity
mismatch). The full public key is embedded (not a fingerprint) so no hash is trusted and
the server needs nothing else to verify signatures.

The server certificate carries ``secagg://server/ed25519/<hex>`` in the same way, so
clients can verify server-signed protocol messages against the key the CA vouched for.

A client certificate issued with the key-holder role (``certs issue ID --role keyholder``)
also carries ``secagg://role/keyholder``: the CA vouches that this client may generate
and hold the round keys of the ``ckks`` mode. Clients additionally pin *which* key holder
they trust by id in their own configuration, so neither the server nor an ordinary client
certificate can make a client the key holder.

Files (PEM; private keys are written with mode 0600)::

    CA_DIR/ca.pem  CA_DIR/ca.key                       -- ca.key never leaves the CA host
    CA_DIR/server/{ca.pem, tls.pem, tls.key, identity.key}
    CA_DIR/client-<id>/{ca.pem, tls.pem, tls.key, identity.key}

or, with a certificate request (the client's private keys never leave its host)::

    client host:  `certs request ID --out DIR` -> DIR/{tls.key, identity.key, request.csr}
    CA host:      `certs issue ID --csr request.csr` -> CA_DIR/client-<id>/{ca.pem, tls.pem}
    client host:  copy ca.pem and tls.pem into DIR
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secagg.errors import ConfigError, InvalidSignature
from secagg.keys import IdentityKey, verify_signature

CLIENT_URI = re.compile(r"^secagg://client/(?P<id>[1-9][0-9]{0,6})/ed25519/(?P<key>[0-9a-f]{64})$")
SERVER_URI = re.compile(r"^secagg://server/ed25519/(?P<key>[0-9a-f]{64})$")
KEYHOLDER_ROLE_URI = "secagg://role/keyholder"
CLIENT_ROLES = ("client", "keyholder")
DEFAULT_DAYS = 365
MAX_CLIENT_ID = 1 << 20  # the masking protocol numbers clients 1..2^20-1


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a TLS connection, as vouched for by the CA."""

    role: str  # "client" or "server"
    client_id: int | None
    identity_public_key: bytes  # raw Ed25519 public key (32 bytes)
    subject: str
    keyholder: bool = False  # a client the CA allowed to hold the ckks round keys


@dataclass(frozen=True)
class Credentials:
    """PEM material one party needs for mutual TLS plus its protocol identity key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity: IdentityKey

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Credentials:
        """Load ``ca.pem``, ``tls.pem``, ``tls.key`` and ``identity.key`` from ``directory``."""
        d = Path(directory)
        missing = [n for n in ("ca.pem", "tls.pem", "tls.key", "identity.key") if not (d / n).is_file()]
        if missing:
            raise ConfigError(
                f"credential directory {d} lacks {', '.join(missing)}; create it with "
                "`secagg certs issue` (clients) or `secagg certs issue --server` (server)"
            )
        return cls(
            ca_pem=(d / "ca.pem").read_bytes(),
            cert_pem=(d / "tls.pem").read_bytes(),
            key_pem=(d / "tls.key").read_bytes(),
            identity=load_identity_key(d / "identity.key"),
        )

    def check_binding(self) -> PeerIdentity:
        """Verify that ``identity.key`` is the key the certificate binds; raise otherwise."""
        peer = identity_from_cert(x509.load_pem_x509_certificate(self.cert_pem))
        if peer.identity_public_key != self.identity.public_bytes:
            raise ConfigError(
                "identity.key does not match the Ed25519 key bound in tls.pem; "
                "re-issue the certificate or use the identity key it was issued for"
            )
        return peer

    def verify_peer(self, cert_pem: bytes) -> PeerIdentity:
        """A certificate a server relays, checked against this party's CA (the rounds' certificate callback)."""
        return verify_certificate(cert_pem, self.ca_pem)


# --------------------------------------------------------------------------- key files


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_identity_key(path: str | os.PathLike) -> IdentityKey:
    """Load an Ed25519 protocol identity key from a PKCS#8 PEM file."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return IdentityKey(key)


def _identity_pem(identity: IdentityKey) -> bytes:
    return _pem_private(ed25519.Ed25519PrivateKey.from_private_bytes(identity.private_bytes()))


# --------------------------------------------------------------------------- CA


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def init_ca(directory: str | os.PathLike, *, name: str = "secagg CA", days: int = 3650, force: bool = False) -> Path:
    """Create a CA key and self-signed certificate in ``directory``; return the cert path."""
    d = Path(directory)
    if (d / "ca.key").exists() and not force:
        raise ConfigError(f"{d / 'ca.key'} exists; refusing to overwrite a CA (pass --force to replace it)")
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _certificate(subject, subject, key.public_key(), days=days, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(d / "ca.key", _pem_private(key))
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "ca.pem"


def _load_ca(directory: Path):
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"no CA in {directory}; run `secagg certs init --dir {directory}` first") from None
    return cert, key


def issue(
    ca_dir: str | os.PathLike,
    *,
    client_id: int | None = None,
    server: bool = False,
    dns: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
    out: str | os.PathLike | None = None,
    days: int = DEFAULT_DAYS,
    identity: IdentityKey | None = None,
    force: bool = False,
    role: str = "client",
) -> Path:
    """Issue a client (``client_id``) or server (``server=True``) certificate bundle.

    ``role="keyholder"`` (clients only) adds the key-holder role (see the module docstring).

    Writes ``ca.pem``, ``tls.pem``, ``tls.key`` and ``identity.key`` into ``out``
    (default ``CA_DIR/client-<id>`` or ``CA_DIR/server``) and returns that directory. A fresh
    Ed25519 identity is generated unless ``identity`` is given.
    """
    if server == (client_id is not None):
        raise ConfigError("issue either a client certificate (CLIENT_ID) or a server certificate (--server)")
    if client_id is not None and not (1 <= client_id < MAX_CLIENT_ID):
        raise ConfigError(f"client id must be an integer from 1 to {MAX_CLIENT_ID - 1} got {client_id}")
    _check_role(role, server)
    d_ca = Path(ca_dir)
    ca_cert, ca_key = _load_ca(d_ca)
    target = Path(out) if out is not None else d_ca / ("server" if server else f"client-{client_id}")
    if (target / "tls.key").exists() and not force:
        raise ConfigError(f"{target} already holds credentials; pass --force to replace them")
    target.mkdir(parents=True, exist_ok=True)
    identity = identity or IdentityKey.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    pub_hex = identity.public_bytes.hex()
    if server:
        cn = f"secagg server {dns[0] if dns else ips[0]}"
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        for ip in ips:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise ConfigError(f"--ip {ip!r} is not an IP address") from None
        names.append(x509.UniformResourceIdentifier(f"secagg://server/ed25519/{pub_hex}"))
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        cn = f"secagg client {client_id}"
        names = _client_names(f"secagg://client/{client_id}/ed25519/{pub_hex}", role)
        eku = ExtendedKeyUsageOID.CLIENT_AUTH
    if not names:
        raise ConfigError("a server certificate needs at least one --dns name or --ip address")
    cert = _sign(ca_cert, ca_key, cn=cn, names=names, eku=eku, public_key=key.public_key(), days=days)
    if not server:
        _retire(d_ca, ca_cert, target / "tls.pem")
    (target / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (target / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(target / "tls.key", _pem_private(key))
    _write_private(target / "identity.key", _identity_pem(identity))
    return target


def _check_role(role: str, server: bool = False) -> None:
    if role not in CLIENT_ROLES:
        raise ConfigError(f"role must be one of {CLIENT_ROLES}, got {role!r}")
    if server and role != "client":
        raise ConfigError("the key-holder role is for a client certificate; the server never holds keys")


def _client_names(identity_uri: str, role: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri)]
    if role == "keyholder":
        names.append(x509.UniformResourceIdentifier(KEYHOLDER_ROLE_URI))
    return names


def _retire(ca_dir: Path, ca_cert, old_cert: Path) -> None:
    """Re-issuing an id revokes the certificate it replaces (when this CA issued it)."""
    if not old_cert.is_file():
        return
    from federation.transport.revocation import issued_by, revoke

    try:
        previous = x509.load_pem_x509_certificate(old_cert.read_bytes())
    except ValueError:
        return
    if issued_by(previous, ca_cert):
        revoke(ca_dir, old_cert.read_bytes(), reason=x509.ReasonFlags.superseded)


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, *, days: int, ca: bool) -> x509.CertificateBuilder:
    """What every certificate of a deployment holds: valid from five minutes ago for ``days``,
    a random serial, and a critical key usage -- a CA signs certificates and CRLs (no path
    below its leaves), a leaf signs only."""
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )


def _sign(ca_cert, ca_key, *, cn: str, names, eku, public_key, days: int) -> x509.Certificate:
    return (
        _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), ca_cert.subject, public_key,
                     days=days, ca=False)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------- requests (CSR)
#
# With a request, a client's private keys never leave its host: `certs request` writes
# tls.key, identity.key and request.csr; the CA checks the request and returns tls.pem.
# The CSR carries the binding URI and, in an extension, an Ed25519 signature proving that
# the requester holds the identity key it asks the CA to bind (over the id and the TLS
# public key, so it cannot be lifted into another request).

POP_OID = x509.ObjectIdentifier("2.25.53875489915881438719831030983344795932")  # X.667 UUID OID
POP_LABEL = b"secagg/v1/csr-proof-of-possession|"


def _pop_message(client_id: int, tls_public_key) -> bytes:
    spki = tls_public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return POP_LABEL + client_id.to_bytes(8, "big") + spki


def request(client_id: int, out: str | os.PathLike, *, force: bool = False) -> Path:
    """On the client host: new TLS and identity keys plus ``request.csr`` for the CA."""
    if not (1 <= client_id < MAX_CLIENT_ID):
        raise ConfigError(f"client id must be an integer from 1 to {MAX_CLIENT_ID - 1}, got {client_id}")
    target = Path(out)
    if (target / "tls.key").exists() and not force:
        raise ConfigError(f"{target} already holds keys; pass --force to replace them")
    target.mkdir(parents=True, exist_ok=True)
    identity = IdentityKey.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    proof = identity.sign(_pop_message(client_id, key.public_key()))
    uri = f"secagg://client/{client_id}/ed25519/{identity.public_bytes.hex()}"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"secagg client {client_id}")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(POP_OID, proof), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(target / "tls.key", _pem_private(key))
    _write_private(target / "identity.key", _identity_pem(identity))
    (target / "request.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return target / "request.csr"


def issue_from_request(
    ca_dir: str | os.PathLike, client_id: int, csr_pem: bytes, *, out: str | os.PathLike | None = None,
    days: int = DEFAULT_DAYS, force: bool = False, role: str = "client",
) -> Path:
    """On the CA: check a client's request and write ``tls.pem`` and ``ca.pem`` (no private keys).

    The role is the CA's decision (``role="keyholder"``), never read from the request.
    """
    _check_role(role)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ConfigError("the request is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise InvalidSignature("the request's signature does not verify")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise ConfigError("the request's TLS key must be an elliptic-curve key (made by `secagg certs request`)")
    try:
        uris = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        proof = csr.extensions.get_extension_for_oid(POP_OID).value.value
    except x509.ExtensionNotFound:
        raise ConfigError("the request lacks the secagg identity binding; create it with `secagg certs request`") from None
    matches = [m for m in (CLIENT_URI.match(u) for u in uris) if m]
    if len(uris) != 1 or len(matches) != 1:
        raise ConfigError("the request must carry exactly one secagg://client/<id>/ed25519/<hex> name")
    if int(matches[0]["id"]) != client_id:
        raise ConfigError(f"the request is for client {matches[0]['id']}, not client {client_id}")
    identity_key = bytes.fromhex(matches[0]["key"])
    verify_signature(identity_key, proof, _pop_message(client_id, csr.public_key()))
    d_ca = Path(ca_dir)
    ca_cert, ca_key = _load_ca(d_ca)
    target = Path(out) if out is not None else d_ca / f"client-{client_id}"
    if (target / "tls.pem").exists() and not force:
        raise ConfigError(f"{target} already holds a certificate; pass --force to replace it")
    target.mkdir(parents=True, exist_ok=True)
    cert = _sign(ca_cert, ca_key, cn=f"secagg client {client_id}",
                 names=_client_names(matches[0].group(0), role),
                 eku=ExtendedKeyUsageOID.CLIENT_AUTH, public_key=csr.public_key(), days=days)
    _retire(d_ca, ca_cert, target / "tls.pem")
    (target / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (target / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return target


# --------------------------------------------------------------------------- peer identity


def identity_from_cert(cert: x509.Certificate) -> PeerIdentity:
    """Read the CA-vouched protocol identity from a (chain-verified) certificate.

    Call this only on a certificate the TLS layer already verified against the CA: it
    checks the binding, not the signature chain. Raises :class:`InvalidSignature` when
    the certificate carries no (or more than one) secagg identity.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    found = []
    keyholder = KEYHOLDER_ROLE_URI in uris
    for uri in uris:
        m = CLIENT_URI.match(uri)
        if m:
            found.append(("client", int(m["id"]), bytes.fromhex(m["key"])))
            continue
        m = SERVER_URI.match(uri)
        if m:
            found.append(("server", None, bytes.fromhex(m["key"])))
    if len(found) != 1:
        raise InvalidSignature(
            "certificate does not bind exactly one secagg protocol identity "
            "(expected one secagg://client/<id>/ed25519/<hex> or secagg://server/ed25519/<hex> URI)"
        )
    role, cid, key = found[0]
    if keyholder and (role != "client" or uris.count(KEYHOLDER_ROLE_URI) != 1):
        raise InvalidSignature("only a client certificate can carry the key-holder role, once")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidSignature("certificate has no extended key usage") from None
    wanted = ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    if wanted not in eku:
        raise InvalidSignature(f"a {role} identity in a certificate without the {role}Auth key usage")
    return PeerIdentity(role=role, client_id=cid, identity_public_key=key, subject=cert.subject.rfc4514_string(),
                        keyholder=keyholder)


def identity_from_pem(pem: bytes) -> PeerIdentity:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise InvalidSignature("peer certificate could not be parsed") from None
    return identity_from_cert(cert)


def verify_certificate(cert_pem: bytes, ca_pem: bytes) -> PeerIdentity:
    """Check that ``cert_pem`` was issued by the CA in ``ca_pem`` and is valid now; return its identity.

    Used by clients to check the certificates of their peers that the server relays: a
    server cannot substitute a peer's protocol key without the CA's signature.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, _CryptoInvalidSignature):
        raise InvalidSignature("certificate was not issued by this deployment's CA") from None
    now = _now()
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise InvalidSignature(f"certificate of {cert.subject.rfc4514_string()} is expired or not yet valid")
    return identity_from_cert(cert)
