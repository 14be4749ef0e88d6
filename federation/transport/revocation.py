"""Certificate revocation: a CA-signed X.509 CRL, written by the CA, re-read by the server.

Theory of operation
-------------------
The CA keeps ``CA_DIR/crl.pem``, a certificate revocation list it signs. ``secagg certs
revoke ID`` adds the current certificate of client ``ID`` to it, and re-issuing an id
(``secagg certs issue ID --force``) adds the certificate it replaces, so a retired
certificate stops working without a new CA. When the CA directory also holds the server's
bundle (``CA_DIR/server``) the list is copied there; otherwise copy ``crl.pem`` into the
server's credential directory (or point ``crl`` in ``[server]`` at it).

The server (:class:`RevocationList`) re-reads the file whenever it changes -- checked at
every new connection and at the start of every round, so no restart is needed -- and
only accepts a list signed by its own CA. A client whose certificate serial is listed is
refused when it connects, and dropped at the next round start if it was connected
before the list changed. A list that does not verify is a configuration error at start;
a bad update while running is logged and the last good list stays in force.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from secagg.errors import ConfigError

log = logging.getLogger("secagg.server")
CRL_NAME = "crl.pem"
CRL_DAYS = 3650  # the list's nextUpdate; it is rewritten on every revocation


def certificate_serial(cert_pem: bytes) -> int:
    try:
        return x509.load_pem_x509_certificate(cert_pem).serial_number
    except ValueError:
        raise ConfigError("not a PEM certificate") from None


def revoke(ca_dir: str | os.PathLike, cert_pem: bytes, *, reason: x509.ReasonFlags = x509.ReasonFlags.unspecified) -> Path:
    """Add ``cert_pem`` (issued by the CA in ``ca_dir``) to the CA's CRL; return the CRL path.

    Also refreshes ``CA_DIR/server/crl.pem`` when the server bundle lives in ``ca_dir``.
    """
    from federation.transport.certs import _load_ca

    d = Path(ca_dir)
    ca_cert, ca_key = _load_ca(d)
    cert = x509.load_pem_x509_certificate(cert_pem)
    if not issued_by(cert, ca_cert):
        raise ConfigError(f"the certificate {cert.subject.rfc4514_string()} was not issued by the CA in {d}")
    now = _dt.datetime.now(_dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + _dt.timedelta(days=CRL_DAYS))
    )
    old = _read_crl(d / CRL_NAME)
    listed = set()
    if old is not None:
        for entry in old:
            builder = builder.add_revoked_certificate(entry)
            listed.add(entry.serial_number)
    if cert.serial_number not in listed:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .add_extension(x509.CRLReason(reason), critical=False)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp = d / f".{CRL_NAME}.tmp"
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, d / CRL_NAME)
    if (d / "server" / "tls.pem").is_file():
        shutil.copyfile(d / CRL_NAME, d / "server" / f".{CRL_NAME}.tmp")
        os.replace(d / "server" / f".{CRL_NAME}.tmp", d / "server" / CRL_NAME)
    return d / CRL_NAME


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read_crl(path: Path) -> x509.CertificateRevocationList | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate revocation list") from None


class RevocationList:
    """The set of revoked certificate serials, re-read from ``path`` when the file changes."""

    def __init__(self, path: str | os.PathLike | None, ca_pem: bytes) -> None:
        self.path = Path(path) if path is not None else None
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self.refresh(strict=True)

    @property
    def serials(self) -> frozenset[int]:
        return self._serials

    def refresh(self, *, strict: bool = False) -> bool:
        """Re-read the list if the file changed; True if the set of serials changed."""
        if self.path is None:
            return False
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return False
        try:
            serials = self._load() if stamp is not None else frozenset()
        except ConfigError as exc:
            if strict:
                raise
            log.error("revocation list %s not reloaded, keeping the previous one: %s", self.path, exc)
            return False
        self._stamp = stamp
        changed, self._serials = serials != self._serials, serials
        if changed:
            log.info("revocation list %s: %d revoked certificate(s)", self.path, len(serials))
        return changed

    def _load(self) -> frozenset[int]:
        crl = _read_crl(self.path)  # type: ignore[arg-type]
        if crl is None:
            return frozenset()
        if crl.issuer != self._ca.subject or not crl.is_signature_valid(self._ca.public_key()):  # type: ignore[arg-type]
            raise ConfigError(f"{self.path} is not signed by this deployment's CA")
        return frozenset(entry.serial_number for entry in crl)

    def is_revoked(self, cert_pem: bytes) -> bool:
        return certificate_serial(cert_pem) in self._serials
