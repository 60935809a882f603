"""QEMU's TLS credentials (kasou.hypervisor.qemu.tls) and the QMP steps that use them, against a scripted monitor."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from kasou import pki
from kasou.config import TlsFiles
from kasou.errors import HypervisorError, MonitorError
from kasou.hypervisor.base import IncomingInfo, LaunchDisk
from kasou.hypervisor.qemu import migration as mig
from kasou.hypervisor.qemu import replication as repl
from kasou.hypervisor.qemu import tls as qtls
from tests.unit.conftest import Qmp


@pytest.fixture
def host_files(tmp_path: Path) -> TlsFiles:
    pki.init_ca(tmp_path / "ca")
    pki.issue(tmp_path / "ca", "h1", ["10.88.0.10"], [], tmp_path / "h1")
    d = tmp_path / "h1"
    return TlsFiles(ca=d / "ca.crt", cert=d / "host.crt", key=d / "host.key")


def test_prepare_builds_a_private_directory(tmp_path: Path, host_files: TlsFiles) -> None:
    d = qtls.prepare(host_files, tmp_path / "run")
    assert d == tmp_path / "run" / "qemu-tls"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    names = sorted(p.name for p in d.iterdir())
    assert names == ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    for role in ("server", "client"):
        assert (d / f"{role}-cert.pem").read_bytes() == host_files.cert.read_bytes()
        assert (d / f"{role}-key.pem").read_bytes() == host_files.key.read_bytes()
        assert stat.S_IMODE((d / f"{role}-key.pem").stat().st_mode) == 0o600
        assert not (d / f"{role}-key.pem").is_symlink()
    assert (d / "ca-cert.pem").read_bytes() == host_files.ca.read_bytes()
    # Again (an agent restart, a renewed certificate): replaced in place, still private.
    host_files.cert.write_bytes(host_files.cert.read_bytes() + b"\n")
    d.chmod(0o755)
    assert qtls.prepare(host_files, tmp_path / "run") == d
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "server-cert.pem").read_bytes() == host_files.cert.read_bytes()
    assert not any(p.name.endswith(".tmp") for p in d.iterdir())


def test_no_files_no_tls(tmp_path: Path, host_files: TlsFiles) -> None:
    host_files.key.unlink()
    assert not qtls.available(host_files)
    assert qtls.prepare(host_files, tmp_path / "run") is None
    assert not (tmp_path / "run" / "qemu-tls").exists()


def test_objects_and_hosts(tmp_path: Path) -> None:
    assert qtls.creds_object("server", tmp_path) == {
        "qom-type": "tls-creds-x509",
        "id": "kasou-tls-server",
        "endpoint": "server",
        "dir": str(tmp_path),
        "verify-peer": True,
    }
    assert qtls.creds_object("client", tmp_path)["id"] == "kasou-tls-client"
    assert qtls.qsd_object(Path("/r/a,b")) == (
        "tls-creds-x509,id=kasou-tls-server,endpoint=server,dir=/r/a,,b,verify-peer=on"
    )
    assert qtls.uri_host("tcp:10.88.0.11:4444") == "10.88.0.11"
    assert qtls.uri_host("tcp:[fd00::2]:4444") == "fd00::2"
    assert qtls.uri_host("tcp:h2.example:4444") == "h2.example"


async def test_ensure_creds_adds_once(tmp_path: Path) -> None:
    q = Qmp(qom_list=[{"name": "type", "type": "string"}])
    assert await qtls.ensure_creds(q, "server", tmp_path) == "kasou-tls-server"
    assert q.names() == ["qom-list", "object-add"]
    assert q.calls[1][1] == qtls.creds_object("server", tmp_path)
    # One left from before is made again from the files as they are now ...
    objects = [{"name": "kasou-tls-client", "type": "child<tls-creds-x509>"}]

    def qom_list(_: Any) -> list[dict[str, Any]]:
        return list(objects)

    def object_del(_: Any) -> dict[str, Any]:
        objects.clear()
        return {}

    q = Qmp(qom_list=qom_list, object_del=object_del)
    assert await qtls.ensure_creds(q, "client", tmp_path) == "kasou-tls-client"
    assert q.names() == ["qom-list", "object-del", "qom-list", "object-add"]
    # ... unless an NBD server or client still uses it.
    objects.append({"name": "kasou-tls-client", "type": "child<tls-creds-x509>"})
    q = Qmp(qom_list=qom_list, object_del=MonitorError("object 'kasou-tls-client' is in use, can not be deleted"))
    assert await qtls.ensure_creds(q, "client", tmp_path) == "kasou-tls-client"
    assert q.names() == ["qom-list", "object-del", "qom-list"]


async def test_ensure_creds_says_when_qemu_cannot_load_them(tmp_path: Path) -> None:
    q = Qmp(qom_list=[], object_add=MonitorError("Unable to access credentials /x/ca-cert.pem"))
    with pytest.raises(HypervisorError, match="cannot load this host's TLS files"):
        await qtls.ensure_creds(q, "server", tmp_path)


async def test_migration_steps_with_tls() -> None:
    q = Qmp()
    await mig.start_incoming(q, "127.0.0.1", "kasou-tls-server")
    assert q.calls[1] == ("migrate-set-parameters", {"tls-creds": "kasou-tls-server"})
    assert q.names()[2] == "migrate-incoming"

    q = Qmp()
    port = await mig.start_nbd_server(q, "127.0.0.1", "kasou-tls-server")
    assert q.calls[0] == (
        "nbd-server-start",
        {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}, "tls-creds": "kasou-tls-server"},
    )

    q = Qmp()
    await mig.set_parameters(q, 100, True, None, "kasou-tls-client", "10.88.0.11")
    assert q.calls[1] == (
        "migrate-set-parameters",
        {
            "downtime-limit": 100,
            "max-bandwidth": 1024 * mig.MiB,
            "tls-creds": "kasou-tls-client",
            "tls-hostname": "10.88.0.11",
        },
    )

    inc = IncomingInfo(
        storage="copy",
        migration_uri="tcp:10.88.0.11:5000",
        nbd_host="10.88.0.11",
        nbd_port=5001,
        exports={"disk0": "disk0"},
        tls=True,
    )
    q = Qmp()
    await mig.start_mirrors(q, inc, ["disk0"], None, "kasou-tls-client")
    assert q.calls[0][1] == {
        "driver": "nbd",
        "node-name": "mig-disk0",
        "server": {"type": "inet", "host": "10.88.0.11", "port": "5001"},
        "export": "disk0",
        "tls-creds": "kasou-tls-client",
        "tls-hostname": "10.88.0.11",
    }


def test_replica_daemon_with_tls(tmp_path: Path) -> None:
    creds = tmp_path / "qemu-tls"
    argv = repl.qsd_argv("qsd", tmp_path / "d.qcow2", "e", "10.88.0.12", 4242, False, tmp_path / "p", creds)
    assert argv[1:3] == ["--object", f"tls-creds-x509,id=kasou-tls-server,endpoint=server,dir={creds},verify-peer=on"]
    server = argv[argv.index("--nbd-server") + 1]
    assert server == "addr.type=inet,addr.host=10.88.0.12,addr.port=4242,max-connections=1,tls-creds=kasou-tls-server"
    plain = repl.qsd_argv("qsd", tmp_path / "d.qcow2", "e", "10.88.0.12", 4242, False, tmp_path / "p")
    assert "--object" not in plain and "tls-creds" not in " ".join(plain)


async def test_replica_attach_with_tls(tmp_path: Path) -> None:
    def sizes(_: Any) -> list[dict[str, Any]]:
        return [{"node-name": n, "image": {"virtual-size": 1024}} for n in ("disk0", "repl-nbd-disk0")]

    q = Qmp(qom_list=[], query_block_jobs=[], query_named_block_nodes=sizes)
    disks = [LaunchDisk(id="disk0", path=str(tmp_path / "d.qcow2"), size_bytes=1024)]
    creds = tmp_path / "qemu-tls"
    assert await repl.attach(q, 0, tmp_path, disks, "disk0", "10.88.0.12", 4242, "e", tls_dir=creds)
    add = next(a for c, a in q.calls if c == "blockdev-add")
    assert add is not None
    assert add["tls-creds"] == "kasou-tls-client" and add["tls-hostname"] == "10.88.0.12"
    assert ("object-add", qtls.creds_object("client", creds)) in q.calls
