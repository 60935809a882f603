"""A guest that escapes QEMU finds nothing: each VM's QEMU runs as its own unprivileged user, sandboxed,
in its own cgroup, and cannot read another VM's disk, the store, the API token or the TLS keys.

Run under the machine's QEMU lock (two tiny guests under TCG). The test kills its QEMUs by pid and
removes its files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.config import ConfineSettings
from kasou.hypervisor.base import RuntimeState
from kasou.hypervisor.qemu import confine as cf
from kasou.hypervisor.qemu.driver import QemuDriver
from kasou.store.sqlite import SqliteStore
from tests.integration.qemu_rig import end_processes, qcow2_copy, scratch, tiny_disk, tiny_spec, wait_for

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

UID_BASE = 65100  # clear of the default range (64000-64999), so a kasou on this machine never shares these users

# The system's Python: the VM's user may not enter the directories of a virtual environment.
PYTHON = "/usr/bin/python3"

# Tries each path given as the VM's user; prints {path: "ok" | errno name}.
PROBE = """
import errno, json, sys
out = {}
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            f.read(1)
        out[p] = "ok"
    except OSError as e:
        out[p] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def status_ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/PID/status, and Seccomp."""
    out: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid", "Groups", "Seccomp"):
            out[key] = [int(x) for x in rest.split()]
    return out


def try_as(uid: int, gid: int, paths: list[Path]) -> dict[str, str]:
    r = subprocess.run(
        [PYTHON, "-I", "-c", PROBE, *map(str, paths)],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


def secret(path: Path, text: str = "secret") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


async def test_an_escaped_qemu_reads_nothing_but_its_own(tiny_image: Path) -> None:
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-conf-")
    # A host's secrets where kasou keeps them: the store, the API token, the TLS key, QEMU's TLS copy.
    home = root / "home"
    home.mkdir(mode=0o700)
    old = os.umask(0o022)  # a usual umask: the store makes itself private all the same
    try:
        store = Path(SqliteStore(home / "kasou.db").path)
    finally:
        os.umask(old)
    token = secret(home / "api.token")
    host_key = secret(home / "tls" / "host.key")
    qemu_tls = root / "run" / "qemu-tls"
    qemu_key = secret(qemu_tls / "server-key.pem")
    secret(qemu_tls / "ca-cert.pem", "ca")
    settings = ConfineSettings(enabled=True, uid_base=UID_BASE, slots=10, memory_overhead_mib=512)
    driver = QemuDriver(root / "run", root / "log", tiny_image, "tcg", tls_dir=qemu_tls, confine=settings)
    try:
        await driver.attach_all()
        disks = {n: qcow2_copy(image_disk, root / "disks" / n / "disk0.qcow2") for n in ("ca", "cb")}
        for i, (name, disk) in enumerate(disks.items()):
            info = await driver.start(tiny_spec(name, f"c0f1e000-0000-4000-8000-00000000000{i}", disk))
            assert info.state == RuntimeState.RUNNING
        pids = {n: (await driver.info(n)).pid for n in disks}  # type: ignore[union-attr]
        ids = {n: status_ids(pid) for n, pid in pids.items() if pid is not None}
        uid_a, uid_b = ids["ca"]["Uid"][0], ids["cb"]["Uid"][0]
        # Each QEMU runs as its own unprivileged user (real, effective, saved, fs), no other group,
        # under a seccomp filter.
        assert ids["ca"]["Uid"] == [uid_a] * 4 and ids["ca"]["Gid"] == [uid_a] * 4, ids
        assert ids["cb"]["Uid"] == [uid_b] * 4, ids
        assert {uid_a, uid_b} == {UID_BASE, UID_BASE + 1}
        assert ids["ca"].get("Groups", []) == [] and ids["ca"]["Seccomp"] == [2], ids
        # In a cgroup of its own, with the guest's memory and QEMU's allowance as its limit.
        cgroup = Path(f"/proc/{pids['ca']}/cgroup").read_text()
        assert "/kasou/vm-ca" in cgroup, cgroup
        group = cf.cgroup_of("ca", cf.host_tag(root / "run"))
        limit_file = "memory.max" if cf.cgroup_v2() else "memory.limit_in_bytes"
        limits = [d / limit_file for d in group.dirs if (d / limit_file).exists()]
        assert limits and int(limits[0].read_text()) == (128 + 512) * 1024 * 1024
        # The guest works (its console shows the writer), so the files it needs are its own.
        await wait_for("ca's guest to run", lambda: _ready(driver, "ca"), 90)
        # As ca's user: its own disk opens; another VM's disk and log, the store, the token and the
        # TLS keys do not.
        others = [disks["cb"], root / "log" / "cb.log", store, Path(f"{store}-wal"), token, host_key, qemu_key]
        seen = try_as(uid_a, uid_a, [disks["ca"], *others])
        assert seen[str(disks["ca"])] == "ok", seen
        assert all(seen[str(p)] == "EACCES" for p in others), seen
        for name in disks:
            await driver.stop(name)
        # The cgroups go with their QEMUs.
        assert not any(d.exists() for n in disks for d in cf.cgroup_of(n, cf.host_tag(root / "run")).dirs)
    finally:
        await driver.close()
        await end_processes(root)
        for n in ("ca", "cb"):
            cf.cgroup_of(n, cf.host_tag(root / "run")).remove()
        shutil.rmtree(root, ignore_errors=True)


async def _ready(driver: QemuDriver, name: str) -> bool:
    info = await driver.info(name)
    return info is not None and info.guest_ready
