"""Migration and replication streams over QEMU's TLS credentials, with real QEMU, qemu-storage-daemon and the tiny guest.

Two "hosts" in one process, each a QemuDriver with its own certificate of one site CA
(kasou.pki, ECDSA P-256) behind its own agent app. Checked: the migration parameters read
back show the credentials (and the destination's name on the source), the incoming port and
the NBD exports refuse a client without a certificate, with another site's certificate or
without TLS, and the VM and its replica work over TLS. Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/integration/test_qemu_tls.py``.
Every test kills its QEMUs and daemons by pid and removes its files.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kasou import pki
from kasou.config import TlsFiles
from kasou.errors import Conflict
from kasou.hypervisor.base import RuntimeState
from kasou.hypervisor.qemu import process
from kasou.hypervisor.qemu import tls as qtls
from tests.integration.qemu_rig import (
    DISK_SIZE,
    AgentHost,
    TwoHosts,
    boot_on_a,
    need_storage_daemon,
    scratch,
    serving,
    tiny_disk,
    wait_for,
    writes_go_on,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

NAME = "tls1"


@dataclass
class Site(TwoHosts):
    no_cert: Path  # QEMU's client credentials with the CA but no certificate
    other_site: Path  # QEMU's client credentials of another CA


def make_host(root: Path, name: str, images: Path, ca: Path) -> AgentHost:
    pki.issue(ca, name, ["127.0.0.1"], [], root / "tls")
    files = TlsFiles(ca=root / "tls" / "ca.crt", cert=root / "tls" / "host.crt", key=root / "tls" / "host.key")
    creds = qtls.prepare(files, root)
    assert creds is not None
    return AgentHost.make(root, name, images, NAME, tls_dir=creds)


@pytest.fixture
async def site(tiny_image: Path) -> AsyncIterator[Site]:
    need_storage_daemon()
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-tls-")
    pki.init_ca(root / "ca")
    pki.init_ca(root / "other-ca", site="another site")
    pki.issue(root / "other-ca", "intruder", ["127.0.0.1"], [], root / "other")
    no_cert, other = root / "no-cert", root / "other-creds"
    for d in (no_cert, other):
        d.mkdir(mode=0o700)
    shutil.copy(root / "ca" / "ca.crt", no_cert / "ca-cert.pem")
    shutil.copy(root / "ca" / "ca.crt", other / "ca-cert.pem")
    shutil.copy(root / "other" / "host.crt", other / "client-cert.pem")
    shutil.copy(root / "other" / "host.key", other / "client-key.pem")
    s = Site(
        root,
        make_host(root / "a", "host-a", tiny_image, root / "ca"),
        make_host(root / "b", "host-b", tiny_image, root / "ca"),
        image_disk,
        "5eb1a5e0-0000-4000-8000-0000000000c1",
        no_cert,
        other,
    )
    async with serving(s):
        yield s


def tls_refused(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> bool:
    """Whether a TLS client (with ``cert`` or none) gets nothing from the server on ``port``: the
    handshake fails, or (TLS 1.3, where the client's certificate is checked after its Finished) the
    server closes the connection before it sends a byte."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as conn:
            conn.settimeout(5)
            conn.sendall(b"\0" * 16)
            return conn.recv(16) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def nbd_client(
    port: int, export: str, creds: Path | None, hostname: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``qemu-img info`` of an NBD export, with QEMU's client credentials in ``creds`` (or without TLS)."""
    opts = f"driver=nbd,host=127.0.0.1,port={port},export={export}"
    obj: list[str] = []
    if creds is not None:
        obj = ["--object", f"tls-creds-x509,id=t,endpoint=client,dir={creds},verify-peer=on"]
        opts += ",tls-creds=t" + (f",tls-hostname={hostname}" if hostname else "")
    return subprocess.run(["qemu-img", "info", *obj, "--image-opts", opts], capture_output=True, text=True, timeout=30)


async def test_migration_over_tls(site: Site) -> None:
    s = site
    await boot_on_a(s)
    disk_b = s.b.root / "disks" / NAME / "disk0.qcow2"
    inc = await s.b.client.prepare_incoming(s.spec(disk_b), "copy")
    assert inc.tls and inc.storage == "copy" and inc.nbd_port is not None

    # The destination listens with its server credentials, and takes no one without a site certificate.
    params = await s.b.qmp("query-migrate-parameters")
    assert params["tls-creds"] == qtls.SERVER_ID, params
    port = int(inc.migration_uri.rsplit(":", 1)[1])
    ca = s.root / "ca" / "ca.crt"
    assert tls_refused(port, ca)
    assert tls_refused(port, ca, s.root / "other" / "host.crt", s.root / "other" / "host.key")
    for creds in (None, s.no_cert, s.other_site):
        r = nbd_client(inc.nbd_port, "disk0", creds)
        assert r.returncode != 0, (creds, r.stdout)
    assert "TLS" in nbd_client(inc.nbd_port, "disk0", None).stderr
    info_b = await s.b.client.info(NAME)
    assert info_b.state == RuntimeState.INCOMING  # the refused clients did not end the wait

    # A host with TLS files never sends in plain TCP.
    with pytest.raises(Conflict):
        await s.a.driver.migrate_out(NAME, inc.model_copy(update={"tls": False}))

    t0 = time.monotonic()
    await s.a.client.migrate_out(NAME, inc, downtime_ms=100)
    params = await s.a.qmp("query-migrate-parameters")
    assert params["tls-creds"] == qtls.CLIENT_ID and params["tls-hostname"] == "127.0.0.1", params
    nodes = {n["node-name"]: n for n in await s.a.qmp("query-named-block-nodes", {"flat": True})}
    assert "mig-disk0" in nodes

    async def completed() -> Any:
        st = await s.a.client.migration_status(NAME)
        assert st.status not in ("failed", "cancelled"), st
        return st if st.status == "completed" else None

    st = await wait_for("the migration over TLS to complete", completed, 120)
    print(
        f"\n[migration over TLS, copy storage] downtime {st.downtime_ms} ms, total {st.total_ms} ms, "
        f"wall {(time.monotonic() - t0) * 1000:.0f} ms"
    )
    await s.b.client.finish_incoming(NAME)
    await s.a.client.finish_out(NAME)
    await writes_go_on(s.b)


async def test_replica_over_tls(site: Site) -> None:
    s = site
    await boot_on_a(s)
    t = await s.b.client.create_replica(NAME, "disk0", DISK_SIZE)
    pid = int(Path(t.path).with_suffix(".pid").read_text())
    argv = " ".join(process.cmdline(pid) or [])
    assert f"id={qtls.SERVER_ID},endpoint=server" in argv and f"tls-creds={qtls.SERVER_ID}" in argv, argv

    # The export takes no client without TLS, without a certificate or with another site's; nor
    # does a client that expects another host's name.
    for creds in (None, s.no_cert, s.other_site):
        r = nbd_client(t.nbd_port, t.export, creds)
        assert r.returncode != 0, (creds, r.stdout)
    r = nbd_client(t.nbd_port, t.export, s.a.driver.tls_dir, hostname="host-c")
    assert r.returncode != 0 and "hostname" in r.stderr, r.stderr

    t0 = time.monotonic()
    st = await s.a.client.attach_replica(NAME, t, timeout_s=60)
    print(f"\n[replication over TLS] in sync {time.monotonic() - t0:.2f} s after attach ({DISK_SIZE >> 20} MiB disk)")
    assert st.state == "in_sync" and st.error is None, st
    objects = {o["name"] for o in await s.a.qmp("qom-list", {"path": "/objects"})}
    assert qtls.CLIENT_ID in objects
    await writes_go_on(s.a)
    [again] = await s.a.client.replica_status(NAME)
    assert again.state == "in_sync", again
    await s.a.client.detach_replica(NAME, "disk0")
    await s.b.client.delete_replica(NAME)
