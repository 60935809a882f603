"""Real directory servers for the tests: a Samba Active Directory domain controller and OpenLDAP's slapd, each in
a network namespace of its own (a veth pair to this one), in a temporary directory, with a TLS certificate from
a test CA. Both hold the same people and groups (:data:`PEOPLE`), so the same tests run against both.

Samba is provisioned and started as the lab's DC is (:mod:`kasou.lab.directory`). Every server is started by
pid (Samba in its single-process model) and ended by pid; its namespace and files
are removed with it. Used by tests/contract/test_directory_contract.py and tests/integration/test_directory.py
(marker ``directory``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyroute2 import IPRoute, netns

from kasou.control.ldapclient import Settings
from kasou.lab import directory as labdir

START_TIMEOUT_S = 90.0
PASSWORD = "Kasou-Test-Pw-1"  # every test user's (Samba's default complexity rules accept it)
SERVICE_PASSWORD = "Kasou-Svc-Pw-2"
ADMIN_PASSWORD = "Kasou-Adm-Pw-3"  # slapd's rootdn
#: user -> groups (directly); carol is disabled and dave must change his password (Samba only: slapd knows neither)
PEOPLE = {"alice": ["kasou-ops"], "bob": ["lab-staff"], "eve": ["canteen"], "carol": ["kasou-ops"],
          "dave": ["kasou-ops"]}  # fmt: skip
NESTED = {"kasou-vendors-lab": ["lab-staff"], "kasou-admins": []}  # group -> groups that are its members


def tools_missing() -> str | None:
    """Why real directory servers cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("samba", "samba-tool", "slapd", "slapadd"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install samba samba-ad-dc samba-ad-provision slapd ldap-utils)"
    if not Path("/usr/share/samba/setup/ad-schema").is_dir():
        return "samba-ad-provision is not installed (samba-tool domain provision needs its files)"
    return None


# -- a test CA ---------------------------------------------------------------------------------------


@dataclass
class DirectoryCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str) -> DirectoryCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .sign(key, hashes.SHA256()))  # fmt: skip
        return cls(key, cert)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, host: str, ip: str, directory: Path) -> tuple[Path, Path]:
        """A server certificate for ``host`` and ``ip``: (cert file, key file, mode 0600)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        san = x509.SubjectAlternativeName([x509.DNSName(host), x509.IPAddress(ipaddress.ip_address(ip))])
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(san, critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))  # fmt: skip
        crt, kf = directory / "server.crt", directory / "server.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))  # fmt: skip
        (directory / "ca.crt").write_text(self.pem)
        return crt, kf


# -- a namespace with a veth to this one -------------------------------------------------------------


@dataclass
class Namespace:
    name: str
    host_if: str
    host_ip: str
    inside_ip: str  # the address the server's certificate names
    other_ip: str  # a second address of the server, not in its certificate

    @classmethod
    def make(cls, kind: str, slot: int) -> Namespace:
        tag = f"{os.getpid() % 100000}{kind[:2]}"
        third = (os.getpid() % 100) * 2 + slot
        ns = cls(f"kdir-{tag}", f"kdir{tag}", f"10.231.{third}.1", f"10.231.{third}.2", f"10.231.{third}.3")
        netns.create(ns.name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=ns.host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.name})
                idx = ipr.link_lookup(ifname=ns.host_if)[0]
                ipr.addr("add", index=idx, address=ns.host_ip, prefixlen=29)
                ipr.link("set", index=idx, state="up")
            with IPRoute(netns=ns.name, flags=0) as ipr:
                for ifname, addrs in (("lo", ()), ("eth0", (ns.inside_ip, ns.other_ip))):
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    for addr in addrs:
                        ipr.addr("add", index=idx, address=addr, prefixlen=29)
                    ipr.link("set", index=idx, state="up")
        except BaseException:
            ns.remove()
            raise
        return ns

    def remove(self) -> None:
        with contextlib.suppress(Exception), IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=self.host_if):
                ipr.link("del", index=idx)
        if self.name in netns.listnetns():
            netns.remove(self.name)

    def pids(self) -> list[int]:
        from kasou.lab.net import pids_in_netns

        return pids_in_netns(self.name)


def wait_port(ip: str, port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"nothing listens on {ip}:{port} after {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}"
    )


def end(proc: subprocess.Popen[bytes], ns: Namespace) -> None:
    """End the server by its pid (and anything else left in its namespace), then the namespace."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in ns.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ns.remove()


@dataclass
class Server:
    """A running directory: how kasou reaches it and what it holds."""

    kind: str  # samba, slapd
    url: str
    starttls_url: str
    base_dn: str
    bind_user: str
    ca: DirectoryCA
    ns: Namespace
    proc: subprocess.Popen[bytes]
    dir: Path
    user_filter: str
    start_s: float = 0.0  # provisioning and start, measured
    features: set[str] = field(default_factory=set)  # disabled, must_change: what this server can refuse

    def settings(self, **kw: object) -> Settings:
        base: dict[str, object] = {"urls": (self.url,), "base_dn": self.base_dn, "bind_user": self.bind_user,
                                   "bind_password": SERVICE_PASSWORD, "ca_pem": self.ca.pem,
                                   "user_filter": self.user_filter, "starttls": False, "timeout_s": 5.0}  # fmt: skip
        base.update(kw)
        return Settings(**base)  # type: ignore[arg-type]

    def group_dn(self, cn: str) -> str:
        return f"CN={cn},CN=Users,{self.base_dn}" if self.kind == "samba" else f"cn={cn},ou=groups,{self.base_dn}"

    def user_dn(self, name: str) -> str:
        return f"CN={name},CN=Users,{self.base_dn}" if self.kind == "samba" else f"uid={name},ou=people,{self.base_dn}"


# -- Samba AD -----------------------------------------------------------------------------------------


def start_samba(ca: DirectoryCA, slot: int = 0) -> Server:
    t0 = time.monotonic()
    ns = Namespace.make("samba", slot)
    d = Path(tempfile.mkdtemp(prefix="kasou-samba-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        crt, key = ca.issue("dc1.kasou.test", ns.inside_ip, d)
        conf = labdir.provision(
            d,
            [ns.inside_ip, ns.other_ip],
            crt,
            key,
            PEOPLE,
            NESTED,
            PASSWORD,
            SERVICE_PASSWORD,
            realm="KASOU.TEST",
            workgroup="KASOU",
            disabled=("carol",),
            must_change=("dave",),
        )
        log = d / "samba.out"
        proc = labdir.spawn(ns.name, conf, log)
        wait_port(ns.inside_ip, 636, proc, log)
    except BaseException:
        if proc is not None:
            end(proc, ns)
        else:
            ns.remove()
        shutil.rmtree(d, ignore_errors=True)
        raise
    base = "DC=kasou,DC=test"
    return Server("samba", f"ldaps://{ns.inside_ip}", f"ldap://{ns.inside_ip}", base,
                  f"CN=kasou-svc,CN=Users,{base}", ca, ns, proc, d, "(&(objectClass=user)(sAMAccountName={name}))",
                  time.monotonic() - t0, {"disabled", "must_change"})  # fmt: skip


# -- OpenLDAP -----------------------------------------------------------------------------------------


def _slapd_ldif(base: str) -> str:
    out = [f"dn: {base}\nobjectClass: dcObject\nobjectClass: organization\no: kasou test\ndc: kasou\n",
           f"dn: ou=people,{base}\nobjectClass: organizationalUnit\nou: people\n",
           f"dn: ou=groups,{base}\nobjectClass: organizationalUnit\nou: groups\n"]  # fmt: skip
    people = {**{u: PASSWORD for u in PEOPLE}, "kasou-svc": SERVICE_PASSWORD}
    for u, pw in people.items():
        out.append(f"dn: uid={u},ou=people,{base}\nobjectClass: inetOrgPerson\nuid: {u}\ncn: {u.capitalize()} Test\n"
                   f"sn: Test\ndisplayName: {u.capitalize()} Test\nuserPassword: {pw}\n")  # fmt: skip
    members: dict[str, list[str]] = {}
    for u, gs in PEOPLE.items():
        for g in gs:
            members.setdefault(g, []).append(f"uid={u},ou=people,{base}")
    for g, ms in NESTED.items():
        members.setdefault(g, []).extend(f"cn={m},ou=groups,{base}" for m in ms)
    for g, ms in sorted(members.items()):
        ms = ms or [f"uid=kasou-svc,ou=people,{base}"]  # groupOfNames needs a member
        out.append(f"dn: cn={g},ou=groups,{base}\nobjectClass: groupOfNames\ncn: {g}\n"
                   + "".join(f"member: {m}\n" for m in ms))  # fmt: skip
    return "\n".join(out)


def start_slapd(ca: DirectoryCA, slot: int = 1) -> Server:
    t0 = time.monotonic()
    ns = Namespace.make("slapd", slot)
    d = Path(tempfile.mkdtemp(prefix="kasou-slapd-"))
    proc: subprocess.Popen[bytes] | None = None
    base = "dc=kasou,dc=test"
    try:
        crt, key = ca.issue("ldap.kasou.test", ns.inside_ip, d)
        (d / "db").mkdir()
        conf = d / "slapd.conf"
        conf.write_text(textwrap.dedent(f"""\
            include /etc/ldap/schema/core.schema
            include /etc/ldap/schema/cosine.schema
            include /etc/ldap/schema/inetorgperson.schema
            include /etc/ldap/schema/nis.schema
            modulepath /usr/lib/ldap
            moduleload back_mdb
            pidfile {d}/slapd.pid
            TLSCACertificateFile {d}/ca.crt
            TLSCertificateFile {crt}
            TLSCertificateKeyFile {key}
            security simple_bind=128
            database mdb
            maxsize 104857600
            suffix "{base}"
            rootdn "cn=admin,{base}"
            rootpw {ADMIN_PASSWORD}
            directory {d}/db
            index objectClass eq
            index member eq
            index uid eq
            access to attrs=userPassword by self write by anonymous auth by * none
            access to * by users read by * none
            """))  # fmt: skip
        (d / "data.ldif").write_text(_slapd_ldif(base))
        subprocess.run(["slapadd", "-f", str(conf), "-l", str(d / "data.ldif")], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
        log = d / "slapd.out"
        urls = f"ldaps://{ns.inside_ip}:636/ ldap://{ns.inside_ip}:389/ ldaps://{ns.other_ip}:636/"
        with log.open("wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "slapd", "-d", "0", "-h", urls, "-f", str(conf)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        wait_port(ns.inside_ip, 636, proc, log)
    except BaseException as e:
        if proc is not None:
            end(proc, ns)
        else:
            ns.remove()
        detail = getattr(e, "stderr", b"") or b""
        shutil.rmtree(d, ignore_errors=True)
        if detail:
            raise RuntimeError(f"slapd: {detail.decode(errors='replace')[-2000:]}") from e
        raise
    return Server("slapd", f"ldaps://{ns.inside_ip}", f"ldap://{ns.inside_ip}", base, f"uid=kasou-svc,ou=people,{base}",
                  ca, ns, proc, d, "(&(objectClass=inetOrgPerson)(uid={name}))", time.monotonic() - t0)  # fmt: skip


def stop(server: Server) -> None:
    end(server.proc, server.ns)
    shutil.rmtree(server.dir, ignore_errors=True)


@contextlib.contextmanager
def running(kind: str, ca: DirectoryCA) -> Iterator[Server]:
    s = start_samba(ca) if kind == "samba" else start_slapd(ca)
    try:
        yield s
    finally:
        stop(s)
