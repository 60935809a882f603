"""The site CA and host certificates (kasou.pki): chain, key modes, SANs, usages, expiry, renewal."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kasou import pki
from kasou.config import Paths, TlsFiles, api_url
from kasou.errors import InvalidSpec


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def foreign_certificate(ca_dir: Path, name: str, ips: list[str], dns: list[str], out: Path) -> TlsFiles:
    """A certificate the site CA signed for something that is not a kasou host (a printer, a badge reader),
    as ``openssl x509 -req -CA ca.crt -CAkey ca.key`` makes it: server and client use, no kasou marker."""
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = pki.load_cert(ca_dir / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "host.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (out / "host.key").chmod(0o600)
    return TlsFiles(ca_dir / "ca.crt", out / "host.crt", out / "host.key")


def test_ca_is_a_ca_with_a_private_key(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    crt = pki.init_ca(d, "general hospital")
    assert mode(d / "ca.key") == 0o600 and mode(d) == 0o700
    cert = pki.load_cert(crt)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "general hospital CA" in cert.subject.rfc4514_string()
    cert.verify_directly_issued_by(cert)  # self-signed
    info = pki.info(crt)
    assert info.is_ca and 3640 <= info.days_left <= 3650
    with pytest.raises(pki.TlsError, match="exists already"):
        pki.init_ca(d)


def test_host_certificate_chain_sans_usages_and_expiry(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    out = tmp_path / "h1"
    crt, key = pki.issue(ca, "h1", ["10.88.0.11", "fd00::11"], ["h1.hospital.example"], out, days=90)
    assert mode(key) == 0o600 and mode(out) == 0o700
    assert (out / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()  # the bundle to install on h1
    pki.verify(crt, ca / "ca.crt")
    cert = pki.load_cert(crt)
    dns, ips = pki.sans_of(cert)
    assert sorted(dns) == ["h1", "h1.hospital.example"]
    assert ips == ["10.88.0.11", "fd00::11"]
    assert ipaddress.ip_address("10.88.0.11") in cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    info = pki.info(crt)
    assert 89 <= info.days_left <= 90 and info.subject == "CN=h1,OU=kasou host,O=kasou"  # OU: kasou's host marker
    assert len(info.sha256.split(":")) == 32


def test_a_kasou_host_is_told_from_another_certificate_of_the_same_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    crt, _ = pki.issue(ca, "h1", ["10.88.0.11"], [], tmp_path / "h1")
    assert pki.peer_refusal(pki.peer_of(crt.read_bytes()), []) is None  # its marker: even before h1 registers
    printer = foreign_certificate(ca, "printer", ["10.1.2.3"], ["printer.hospital.example"], tmp_path / "printer")
    pki.verify(printer.cert, ca / "ca.crt")  # the site CA did sign it
    why = pki.peer_refusal(pki.peer_of(printer.cert.read_bytes()), ["h1", "10.88.0.11"])
    assert why is not None and "CN=printer" in why and "kasou host" in why and "\n" not in why, why
    assert pki.peer_refusal(None, ["h1"]) is not None  # no certificate at all
    # kasou's CA issuing for something else (etcd, a monitoring client) leaves the marker out
    svc, _ = pki.issue(ca, "etcd", ["10.88.0.1"], [], tmp_path / "etcd", kasou_host=False)
    assert pki.peer_refusal(pki.peer_of(svc.read_bytes()), ["h1", "10.88.0.11"]) is not None
    # the hospital's own PKI (KASOU_TLS_CERT): no kasou marker, but it names a registered host
    hosp = foreign_certificate(ca, "h2.hospital.example", ["10.88.0.12"], ["h2.hospital.example"], tmp_path / "h2")
    pem = hosp.cert.read_bytes()
    assert pki.peer_refusal(pki.peer_of(pem), ["h1", "h2.hospital.example"]) is None
    assert pki.peer_refusal(pki.peer_of(pem), ["h1", "10.88.0.12"]) is None
    assert pki.peer_refusal(pki.peer_of(pem), ["h1", "10.88.0.11", "h2"]) is not None


def test_expiry_never_outlives_the_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, days=30)
    crt, _ = pki.issue(tmp_path, "h1", [], [], tmp_path / "h1", days=825)
    assert pki.load_cert(crt).not_valid_after_utc <= pki.load_cert(tmp_path / "ca.crt").not_valid_after_utc


def test_a_certificate_of_another_ca_does_not_verify(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "site")
    pki.init_ca(tmp_path / "other")
    crt, _ = pki.issue(tmp_path / "other", "h1", ["10.0.0.1"], [], tmp_path / "h1")
    with pytest.raises(pki.TlsError, match="not signed by"):
        pki.verify(crt, tmp_path / "site" / "ca.crt")


def test_renew_keeps_names_with_a_new_key_and_expiry(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    out = tmp_path / "h2"
    crt, key = pki.issue(tmp_path, "h2", ["10.0.0.2"], ["h2.example"], out, days=10)
    old_key, old = key.read_bytes(), pki.load_cert(crt)
    pki.renew(tmp_path, out, days=400)
    new = pki.load_cert(crt)
    assert pki.sans_of(new) == pki.sans_of(old) and new.subject == old.subject
    assert pki.peer_refusal(pki.peer_of(crt.read_bytes()), []) is None
    assert key.read_bytes() != old_key and mode(key) == 0o600
    assert new.not_valid_after_utc - old.not_valid_after_utc > dt.timedelta(days=380)
    pki.verify(crt, tmp_path / "ca.crt")


@pytest.mark.parametrize(("ips", "dns"), [(["10.0.0.300"], []), (["h1"], []), ([], ["a b"]), ([], ["x/y"])])
def test_bad_names_are_refused(tmp_path: Path, ips: list[str], dns: list[str]) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(InvalidSpec):
        pki.issue(tmp_path, "h1", ips, dns, tmp_path / "h1")
    assert not (tmp_path / "h1" / "host.key").exists()


def test_missing_files_are_one_clear_line(tmp_path: Path) -> None:
    files = TlsFiles(ca=tmp_path / "ca.crt", cert=tmp_path / "host.crt", key=tmp_path / "host.key")
    with pytest.raises(pki.TlsError, match="kasou tls init") as e:
        pki.require(files, "the agent on TCP")
    assert "\n" not in e.value.message
    assert pki.trust(files) is True  # no site CA: the system's trusted CAs (a hospital's public certificate)


def test_files_come_from_the_home_or_the_hospitals_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KASOU_TLS_DIR", "KASOU_CA", "KASOU_TLS_CERT", "KASOU_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    paths = Paths.from_env(tmp_path)
    assert paths.tls_files() == TlsFiles(tmp_path / "tls/ca.crt", tmp_path / "tls/host.crt", tmp_path / "tls/host.key")
    monkeypatch.setenv("KASOU_CA", "/etc/hospital/ca.pem")
    monkeypatch.setenv("KASOU_TLS_CERT", "/etc/hospital/kasou.pem")
    monkeypatch.setenv("KASOU_TLS_KEY", "/etc/hospital/kasou.key")
    assert paths.tls_files() == TlsFiles(
        Path("/etc/hospital/ca.pem"), Path("/etc/hospital/kasou.pem"), Path("/etc/hospital/kasou.key")
    )


def test_api_url_defaults_to_https_off_loopback() -> None:
    assert api_url("127.0.0.1:8470") == "http://127.0.0.1:8470"
    assert api_url("10.0.0.5:8470") == "https://10.0.0.5:8470"
    assert api_url("kasou.hospital.example:8470") == "https://kasou.hospital.example:8470"
    assert api_url("https://127.0.0.1:8470/") == "https://127.0.0.1:8470"
