"""The backup server's own TLS certificate: self-signed, made by ``kasou backup-server init`` (the server
shares nothing with the cluster's site CA). Clients pin the SHA-256 fingerprint of its DER form."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kasou.errors import Conflict, InvalidSpec, KasouError

VALID_DAYS = 3650


def make_certificate(tls_dir: Path, name: str) -> str:
    """Write ``cert.pem`` and ``key.pem`` (0600) into ``tls_dir``; returns the fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kasou backup server"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(tls_dir / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tls_dir / "cert.pem").write_bytes(cert_pem)
    return fingerprint_pem(cert_pem.decode())


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as typed (colons, spaces, either case, optional ``sha256:``) → 64 lowercase hex digits."""
    t = text.strip().lower()
    t = t.removeprefix("sha256:").removeprefix("sha256/").replace(":", "").replace(" ", "")
    if len(t) != 64 or any(c not in "0123456789abcdef" for c in t):
        raise InvalidSpec("a fingerprint is the SHA-256 of the certificate: 64 hex digits", field="fingerprint")
    return t


def fingerprint_pem(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def display(fp: str) -> str:
    """``AB:CD:…`` as ``init`` and ``show`` print it."""
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


def cert_fingerprint(tls_dir: Path) -> str:
    return fingerprint_pem((tls_dir / "cert.pem").read_text())


def pinned_context(host: str, port: int, fingerprint: str, timeout: float = 10.0) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the certificate ``host:port`` presents, once its SHA-256
    matches ``fingerprint`` (else Conflict, nothing sent). Host names are not checked: the pin is the
    identity, as with Proxmox Backup Server's clients."""
    want = normalize_fingerprint(fingerprint)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as e:
        raise KasouError(f"cannot reach {host}:{port} over TLS: {e}") from None
    got = fingerprint_pem(pem)
    if got != want:
        raise Conflict(f"{host}:{port} presents certificate {display(got)}, not the pinned {display(want)}")
    ctx = ssl.create_default_context(cadata=pem)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def local_host() -> str:
    return socket.gethostname().split(".")[0]
