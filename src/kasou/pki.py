"""The site's certificates: a small CA of kasou's own (or the hospital's), host certificates, TLS contexts.

One CA per site signs one certificate per host. A host's certificate is both a server
certificate (its API and its agent) and a client certificate (its control plane calling
agents and forwarding to the leader), with the host's names and addresses as SANs.
Keys are ECDSA P-256, written with mode 0600. Files of a host (``KASOU_TLS_DIR``, default
``$KASOU_HOME/tls``): ``ca.crt`` (the trust anchor), ``host.crt``, ``host.key``; the machine
that made the CA also keeps ``ca.key`` and the bundles it issued under ``issued/HOST/``.
A hospital's own CA bundle, certificate and key replace them through ``KASOU_CA``,
``KASOU_TLS_CERT`` and ``KASOU_TLS_KEY`` (:func:`kasou.config.tls_files`).

Who may call an agent, or forward to the leader, is narrower than "signed by the CA": the CA (above
all a hospital's) also signs printers and badge readers. A peer is a kasou host when its certificate
carries kasou's host marker, ``OU=kasou host`` in its subject (every certificate :func:`issue` makes for
a host has it, so it works before the host is registered), or when one of its SANs names a host of the
cluster's registry, by name or address (the route for a hospital's own certificates): :func:`peer_refusal`.
The marker is a subject attribute rather than an extended key usage of kasou's own: kasou has no
registered OID arc, and an unregistered ``2.25.<UUID>`` one has arcs past 64 bits, which gnutls (QEMU's
TLS, which loads these same certificates) refuses to parse.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kasou.errors import InvalidSpec

# ssl-only contexts, in kasou.tlsctx so that a command line need not load cryptography; exported here too
from kasou.tlsctx import TlsError as TlsError
from kasou.tlsctx import client_context as client_context
from kasou.tlsctx import host_client_context as host_client_context
from kasou.tlsctx import require as require
from kasou.tlsctx import server_context as server_context
from kasou.tlsctx import trust as trust

CA_DAYS = 3650
HOST_DAYS = 825  # renew with `kasou tls issue` (or `kasou tls renew`) before; `kasou tls show` says when
RENEW_WARN_DAYS = 30
KASOU_HOST_OU = "kasou host"  # the subject's OU of a kasou host's certificate: what agents and the leader accept


@dataclass(frozen=True)
class CertInfo:
    path: str
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    sha256: str
    dns: list[str]
    ips: list[str]
    is_ca: bool

    @property
    def days_left(self) -> int:
        return (self.not_after - dt.datetime.now(dt.UTC)).days


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _private_dir(d: Path) -> None:
    """A directory of keys: made (or kept) private to its owner."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from its first byte (never readable by others, even briefly)."""
    _private_dir(path.parent)
    write_secret(path, data)


def write_secret(path: Path, data: bytes) -> None:
    """``path`` with mode 0600 from its first byte, replaced at once (its directory as it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    _private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise TlsError(f"no certificate at {path}") from None
    except ValueError as e:
        raise TlsError(f"{path} is not a PEM certificate ({e})") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise TlsError(f"no key at {path}") from None
    except (ValueError, TypeError) as e:
        raise TlsError(f"{path} is not an unencrypted PEM key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"{path}: the CA key must be an EC key")
    return key


def init_ca(directory: Path, site: str = "kasou site", days: int = CA_DAYS) -> Path:
    """Make the site CA (``ca.crt``, ``ca.key`` 0600) in ``directory``; refuses to replace one."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if key_path.exists() or crt.exists():
        raise TlsError(f"a CA exists already in {directory}; remove it first to make a new one")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kasou"), x509.NameAttribute(NameOID.COMMON_NAME, f"{site} CA")]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(crt, _cert_pem(cert))
    return crt


def _sans(ips: list[str], dns: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for d in dns:
        if not d or any(c in d for c in " /\\:@") or len(d) > 253:
            raise InvalidSpec(f"{d!r} is not a DNS name", field="dns")
        out.append(x509.DNSName(d))
    for ip in ips:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise InvalidSpec(f"{ip!r} is not an IP address", field="ip") from None
    return out


def _host_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    host: str,
    ips: list[str],
    dns: list[str],
    days: int,
    kasou_host: bool,
) -> x509.Certificate:
    """A certificate for ``host`` (server and client use) on ``public_key``, signed by the CA."""
    if not host or any(c in host for c in "/\\ ") or host.startswith("."):
        raise InvalidSpec(f"{host!r} is not a host name", field="host")
    names = _sans(ips, sorted({host, *dns}))
    not_after = min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kasou")]
    if kasou_host:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, KASOU_HOST_OU))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([*subject, x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def issue(
    ca_dir: Path,
    host: str,
    ips: list[str],
    dns: list[str],
    out_dir: Path,
    days: int = HOST_DAYS,
    kasou_host: bool = True,
) -> tuple[Path, Path]:
    """Sign a certificate for ``host`` (server and client use) with the CA in ``ca_dir``.

    Writes ``out_dir/host.crt``, ``out_dir/host.key`` (0600) and a copy of ``ca.crt``: the
    directory to install as that host's ``KASOU_TLS_DIR``. Issuing again renews (a new key).
    ``kasou_host``: with kasou's host marker (``OU=kasou host``); without it for a service that is not
    a kasou host (etcd, a monitoring client), which agents and the leader then refuse."""
    if not host or any(c in host for c in "/\\ ") or host.startswith("."):
        raise InvalidSpec(f"{host!r} is not a host name", field="host")
    ca_cert = load_cert(ca_dir / "ca.crt")
    ca_key = _load_key(ca_dir / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _host_cert(ca_cert, ca_key, key.public_key(), host, ips, dns, days, kasou_host)
    _write_private(out_dir / "host.key", _key_pem(key))
    _write_public(out_dir / "host.crt", _cert_pem(cert))
    if out_dir.absolute() != ca_dir.absolute():
        _write_public(out_dir / "ca.crt", _cert_pem(ca_cert))
    return out_dir / "host.crt", out_dir / "host.key"


# -- joining a host: its key never leaves it -----------------------------------------------------


def make_request(host: str) -> tuple[bytes, bytes]:
    """A new key (PEM, to keep on this host) and a certificate signing request for ``host`` (PEM, to send)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_request(
    ca_dir: Path, csr_pem: str | bytes, host: str, ips: list[str], dns: list[str], kasou_host: bool = True
) -> bytes:
    """Sign a host's certificate signing request with the CA in ``ca_dir``: the names and addresses are the
    ones given here (what the CA vouches for), never the request's own; the request only brings the public
    key, and its signature proves the requester holds the private one. Returns the certificate (PEM)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
    except ValueError as e:
        raise InvalidSpec(f"the certificate signing request is not PEM ({e})", field="csr") from None
    if not csr.is_signature_valid:
        raise InvalidSpec("the certificate signing request's signature does not verify", field="csr")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidSpec("the certificate signing request must hold an EC key", field="csr")
    cert = _host_cert(
        load_cert(ca_dir / "ca.crt"), _load_key(ca_dir / "ca.key"), public_key, host, ips, dns, HOST_DAYS, kasou_host
    )
    return _cert_pem(cert)


def pem_of(path: Path) -> bytes:
    """The certificate at ``path``, checked, as PEM."""
    return _cert_pem(load_cert(path))


def fingerprint(cert_pem: str | bytes) -> str:
    """The SHA-256 of a certificate (its DER), in hex: what a join token carries of the site CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    except ValueError as e:
        raise TlsError(f"not a PEM certificate ({e})") from None
    return cert.fingerprint(hashes.SHA256()).hex()


def write_host_files(directory: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """Install a host's TLS files (``ca.crt``, ``host.crt``, ``host.key`` 0600) in ``directory`` (0700)."""
    _write_public(directory / "ca.crt", ca_pem)
    _write_public(directory / "host.crt", cert_pem)
    _write_private(directory / "host.key", key_pem)


def sans_of(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(dns names, ip addresses) of a certificate."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return list(ext.get_values_for_type(x509.DNSName)), [str(i) for i in ext.get_values_for_type(x509.IPAddress)]


def is_kasou_host(cert: x509.Certificate) -> bool:
    """Does the certificate carry kasou's host marker (``OU=kasou host``, put there by :func:`issue`)?"""
    return any(a.value == KASOU_HOST_OU for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME))


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a mutual TLS connection, as its certificate says."""

    subject: str
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    kasou_host: bool
    serial: int | None = None  # the certificate's serial number: what a revocation names


def peer_of(pem: str | bytes) -> Peer:
    """The peer a (PEM) certificate names; a certificate that cannot be read is a peer of nothing."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        return Peer(subject="an unreadable certificate", dns=(), ips=(), kasou_host=False)
    dns, ips = sans_of(cert)
    return Peer(cert.subject.rfc4514_string(), tuple(dns), tuple(ips), is_kasou_host(cert), cert.serial_number)


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return text.strip().lower().rstrip(".")


def peer_refusal(peer: Peer | None, known: Iterable[str]) -> str | None:
    """Why ``peer`` may not call (one line), or None when it may: its certificate carries kasou's host
    marker, or one of its SANs (DNS name or IP address) is a name or address of a known host.

    ``known``: the hosts of the registry (their names and the addresses of their agent URLs)."""
    if peer is None:
        return "no client certificate was presented; kasou hosts present theirs (kasou tls issue)"
    if peer.kasou_host:
        return None
    names = {_address(k) for k in known if k}
    if names & {_address(n) for n in (*peer.dns, *peer.ips)}:
        return None
    sans = ", ".join((*peer.dns, *peer.ips)) or "none"
    return (
        f"the certificate {peer.subject} (SANs: {sans}) is not a kasou host's: it lacks the kasou host marker "
        f"(OU={KASOU_HOST_OU}, made by kasou tls issue) and names no registered host"
    )


def serial_of(pem: str | bytes) -> int:
    """A certificate's serial number (PEM); InvalidSpec if it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem).serial_number
    except ValueError as e:
        raise InvalidSpec(f"not a PEM certificate ({e})", field="certificate") from None


def not_after_of(pem: str | bytes) -> float:
    """When a certificate (PEM) stops being valid (UNIX time)."""
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    return cert.not_valid_after_utc.timestamp()


def make_crl(ca_dir: Path, serials: Iterable[int], number: int) -> bytes:
    """A certificate revocation list (PEM) of ``serials``, signed by the CA in ``ca_dir`` (its ``ca.key``), valid
    as long as the CA: etcd reads it at each new connection (``--client-crl-file``, ``--peer-crl-file``)."""
    ca_cert = load_cert(ca_dir / "ca.crt")
    ca_key = _load_key(ca_dir / "ca.key")
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def crl_serials(pem: bytes, ca_pem: bytes) -> set[int]:
    """The serials a CRL (PEM) revokes, once its signature is checked against the CA (PEM)."""
    crl = x509.load_pem_x509_crl(pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    public_key = ca.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public_key):
        raise TlsError("the revocation list is not signed by the site CA")
    return {r.serial_number for r in crl}


def info(path: Path) -> CertInfo:
    cert = load_cert(path)
    dns, ips = sans_of(cert)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(
        path=str(path), subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(), dns=dns, ips=ips, is_ca=is_ca,
    )  # fmt: skip


def verify(cert_path: Path, ca_path: Path) -> None:
    """Raise TlsError unless ``cert_path`` is signed by the CA at ``ca_path`` and valid now."""
    cert, ca = load_cert(cert_path), load_cert(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise TlsError(f"{cert_path} is not signed by the CA {ca_path} ({type(e).__name__})") from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsError(f"{cert_path} is not valid now (valid until {cert.not_valid_after_utc:%Y-%m-%d})")


# -- TLS contexts -------------------------------------------------------------------------------


def renew(ca_dir: Path, cert_dir: Path, days: int = HOST_DAYS, kasou_host: bool = True) -> tuple[Path, Path]:
    """Issue the certificate in ``cert_dir`` again (same host name and SANs, a new key and expiry); a host's
    certificate made before kasou's host marker existed gets it."""
    old = load_cert(cert_dir / "host.crt")
    cn = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn:
        raise TlsError(f"{cert_dir / 'host.crt'} has no common name to renew")
    dns, ips = sans_of(old)
    return issue(ca_dir, str(cn[0].value), ips, dns, cert_dir, days, kasou_host)
