"""Backups through one host's agent with real QEMU and the tiny guest writing: running and stopped VMs,
a missing bitmap, a failed backup, a mirrored disk, restore and its verification.

Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/integration/test_backup_agent.py``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kasou.agent.models import BackupCreate, BackupMade, BackupRestore, BackupSource
from kasou.errors import BackupCorrupt, OperationTimeout
from kasou.hypervisor.backups import bitmap_name
from kasou.hypervisor.base import LaunchSpec
from tests.integration.qemu_rig import (
    AgentHost,
    end_processes,
    qcow2_copy,
    scratch,
    start_writing,
    tiny_disk,
    tiny_spec,
    wait_for,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

NAME = "bk1"


class Host(AgentHost):
    @property
    def disk(self) -> Path:
        return self.disks / NAME / "disk0.qcow2"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    def spec(self, name: str = NAME, disk: Path | None = None) -> LaunchSpec:
        return tiny_spec(name, "5eb1a5e0-0000-4000-8000-00000000b0c1", disk or self.disk)

    async def backup(
        self, gen: int, prev: BackupMade | None = None, prev_id: str | None = None, **kw: Any
    ) -> BackupMade:
        src = BackupSource(
            disk_id="disk0", path=str(self.disk),
            backing=prev.files[0].path if prev else None, base_bitmap=bitmap_name(prev_id) if prev_id else None,
        )  # fmt: skip
        return await self.client.create_backup(
            NAME, BackupCreate(generation=gen, backup_id=f"gen{gen}", disks=[src], **kw)
        )

    async def dirty(self) -> int:
        nodes = await self.qmp("query-named-block-nodes", {"flat": True})
        return int(next(n for n in nodes if n["node-name"] == "disk0")["dirty-bitmaps"][0]["count"])

    async def bitmaps(self) -> list[str]:
        nodes = await self.qmp("query-named-block-nodes", {"flat": True})
        node = next(n for n in nodes if n["node-name"] == "disk0")
        return sorted(b["name"] for b in node.get("dirty-bitmaps") or [])


@pytest.fixture
async def host(tiny_image: Path) -> AsyncIterator[Host]:
    image_disk = tiny_disk(tiny_image)
    root = scratch("kasou-bk-")
    h = Host.make(root, "h1", tiny_image, NAME)  # its backups: root / "backups", the agent's default
    qcow2_copy(image_disk, h.disk, timeout=None)
    await h.driver.attach_all()
    try:
        yield h
    finally:
        await h.close()
        await end_processes(root, check=False)
        shutil.rmtree(root, ignore_errors=True)


async def boot(h: Host, name: str = NAME, disk: Path | None = None, lines: int = 3) -> None:
    await start_writing(h, h.spec(name, disk), lines)


async def more_lines(h: Host, n: int = 5) -> None:
    last = h.seqs()[-1]

    async def grew() -> bool:
        return h.seqs()[-1] >= last + n

    await wait_for("more lines", grew, 30)


async def recovered_of(h: Host, name: str, disk: Path) -> int:
    await h.client.start(h.spec(name, disk))

    async def said() -> int | None:
        for ln in h.log(name).splitlines():
            if ln.startswith("recovered "):
                return int(ln.split()[1]) or -1
        return None

    n = await wait_for(f"{name} to say recovered", said, 90)
    await h.client.action(name, "stop")
    await h.client.forget(name)
    return max(n, 0)


async def test_running_full_then_incremental_restore_each(host: Host) -> None:
    await boot(host)
    lo1 = host.seqs()[-1]
    g1 = await host.backup(1)
    hi1 = host.seqs()[-1] + 1
    f1 = g1.files[0]
    assert g1.running and f1.kind == "full" and f1.bitmap == bitmap_name("gen1") and f1.note == ""
    assert await host.bitmaps() == [bitmap_name("gen1")]
    await more_lines(host, 10)
    lo2 = host.seqs()[-1]
    g2 = await host.backup(2, g1, "gen1")
    hi2 = host.seqs()[-1] + 1
    f2 = g2.files[0]
    assert f2.kind == "incremental" and f2.backing == f1.path, f2
    assert await host.bitmaps() == [bitmap_name("gen2")]  # gen1's bitmap has served
    assert f2.bytes_copied < f1.bytes_copied / 4, (f1.bytes_copied, f2.bytes_copied)
    info = subprocess.run(["qemu-img", "info", "-U", f2.path], capture_output=True, text=True, check=True).stdout
    assert Path(f1.path).name in info  # relative backing name: the directory can move whole
    print(
        f"\n[backup] full {f1.bytes_copied} B copied, incremental {f2.bytes_copied} B; {g2.copy_s} s + verify {g2.verify_s} s"
    )
    for gen, f, lo, hi in ((1, f1, lo1, hi1), (2, f2, lo2, hi2)):
        await host.client.verify_backup(f.path, f.digest)
        disk = await host.client.restore_backup(
            BackupRestore(vm=f"r{gen}", disk_id="disk0", path=f.path, digest=f.digest)
        )
        n = await recovered_of(host, f"r{gen}", Path(disk.path))
        assert lo <= n <= hi, (gen, lo, n, hi)


async def test_missing_bitmap_failed_backup_and_a_stopped_vm(host: Host) -> None:
    await boot(host)
    g1 = await host.backup(1)
    await host.qmp(
        "block-dirty-bitmap-remove", {"node": "disk0", "name": bitmap_name("gen1")}
    )  # the disk "was replaced"
    g2 = await host.backup(2, g1, "gen1")
    assert g2.files[0].kind == "full" and "bitmap is missing" in g2.files[0].note, g2.files[0]
    # A backup that fails (here: out of time) leaves no file, job or node, and the bitmap as it was.
    out = await host.qmp(
        "human-monitor-command",
        {"command-line": 'qemu-io -d /machine/peripheral/disk0-dev/virtio-backend "write -P 0x5a 40M 8M"'},
    )
    assert "rror" not in out, out
    assert await host.dirty() >= 8 << 20
    with pytest.raises(OperationTimeout):
        await host.backup(3, g2, "gen2", timeout_s=1, bandwidth_mib_s=1)
    assert sorted(p.name for p in (host.backups / NAME / "disk0").iterdir()) == sorted(
        [Path(g1.files[0].path).name, f"{Path(g1.files[0].path).name}.json",
         Path(g2.files[0].path).name, f"{Path(g2.files[0].path).name}.json"]
    )  # fmt: skip
    assert await host.qmp("query-jobs") == []
    assert not [n for n in await host.qmp("query-named-block-nodes", {"flat": True}) if n["node-name"].startswith("bk")]
    assert await host.bitmaps() == [bitmap_name("gen2")]
    assert await host.dirty() >= 8 << 20  # the writes before the failed backup are still to be backed up
    g3 = await host.backup(3, g2, "gen2")
    assert g3.files[0].kind == "incremental" and g3.files[0].bytes_copied >= 8 << 20
    # Stopped: an incremental by content, and a bitmap left so the next running backup is incremental.
    await more_lines(host, 5)
    await host.client.action(NAME, "stop")
    await host.client.forget(NAME)
    g4 = await host.backup(4, g3, "gen3")
    assert not g4.running and g4.files[0].kind == "incremental", g4
    await boot(host, lines=1)
    g5 = await host.backup(5, g4, "gen4")
    assert g5.running and g5.files[0].kind == "incremental", g5
    # A damaged file is refused at restore, and nothing is made.
    bad = Path(g1.files[0].path)
    data = bytearray(bad.read_bytes())
    for off in range(len(data) // 2, len(data) // 2 + 4096):
        data[off] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(BackupCorrupt):
        await host.client.restore_backup(
            BackupRestore(vm="r1", disk_id="disk0", path=str(bad), digest=g1.files[0].digest)
        )
    assert not (host.root / "disks" / "r1").exists()


async def test_mirrored_disk_gets_a_full_copy(host: Host) -> None:
    await boot(host)
    second = host.root / "disks" / NAME / "disk0.second.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(second), "64M"], check=True)
    await host.qmp(
        "blockdev-add", {"node-name": "m2", "driver": "qcow2", "file": {"driver": "file", "filename": str(second)}}
    )
    await host.qmp("blockdev-mirror", {"job-id": "mj", "device": "disk0", "target": "m2", "sync": "full",
                                       "copy-mode": "write-blocking"})  # fmt: skip
    g1 = await host.backup(1)
    assert g1.files[0].kind == "full" and "mirrored" in g1.files[0].note, g1.files[0]
    g2 = await host.backup(2, g1, "gen1")
    assert g2.files[0].kind == "full"
    jobs = await host.qmp("query-jobs")
    assert [j["id"] for j in jobs] == ["mj"], jobs  # the mirror runs on
    disk = await host.client.restore_backup(
        BackupRestore(vm="r2", disk_id="disk0", path=g2.files[0].path, digest=g2.files[0].digest)
    )
    assert await recovered_of(host, "r2", Path(disk.path)) >= 1
