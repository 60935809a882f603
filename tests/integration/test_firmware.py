"""UEFI and a TPM on real QEMU: the tiny guest under OVMF (its kernel given through fw_cfg) with a TPM
2.0 from swtpm, through two hosts' agents: it boots, migrates with local disks (its variable store
mirrored, its TPM's state in the migration stream), survives a stop and a start, and is backed up and
restored with both. Also the start time under bios and uefi (medians of 3, printed with ``-s``).

Run under the machine's QEMU lock:
``flock /tmp/kasou-qemu.lock .venv/bin/pytest -s tests/integration/test_firmware.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import statistics
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kasou.agent.models import BackupCreate, BackupRestore, BackupSource, FirmwareCreate, TpmRestore
from kasou.hypervisor.base import LaunchDisk, LaunchSpec, RuntimeState
from kasou.hypervisor.qemu import firmware as fw
from kasou.hypervisor.qemu import tpm
from kasou.hypervisor.snapshots import SnapshotDiskNow, SnapshotRevert, SnapshotTake
from kasou.model.firmware import VARS_ID, moved
from tests.integration.conftest import Kasou
from tests.integration.qemu_rig import (
    DISK_SIZE,
    AgentHost,
    TwoHosts,
    end_processes,
    qcow2_copy,
    scratch,
    serving,
    start_writing,
    swtpm_pids,
    tiny_disk,
    wait_for,
    writes_go_on,
)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(300),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing

NAME = "fw1"
UUID = "5eb1a5e0-0000-4000-8000-0000000000f1"
MEMORY = 256  # OVMF needs more than SeaBIOS (kasou.model.firmware.UEFI_MIN_MEMORY_MIB)
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def permall(state: str | Path) -> bytes:
    return (Path(state) / "tpm2-00.permall").read_bytes()


def ek_certificate(state: str | Path) -> bytes:
    """256 bytes of the endorsement key's certificate (DER) that swtpm_setup put in the TPM's NV memory:
    random key material, found only in this TPM's state."""
    data = permall(state)
    at = data.find(b"\x30\x82")
    assert at >= 0, "no certificate in the TPM's state"
    return data[at : at + 256]


def spec(disk: Path, nvram: str | None, tpm_state: str | None, firmware: str = "uefi", name: str = NAME) -> LaunchSpec:
    return LaunchSpec(
        name=name, uuid=UUID, vcpus=1, memory_mib=MEMORY, image="tiny", firmware=firmware,  # type: ignore[arg-type]
        nvram=nvram, tpm_state=tpm_state, disks=[LaunchDisk(id="disk0", path=str(disk), size_bytes=DISK_SIZE)],
    )  # fmt: skip


def boots(store: str | Path) -> int:
    """OVMF's monotonic counter variable ``MTC`` in a variable store: it goes up by one at every boot, so a
    store that was replaced by a fresh one (or never kept) shows it. 0: no such variable (a fresh store).

    A variable is an authenticated variable header (60 bytes: StartId 0x55AA, State, ..., NameSize and
    DataSize at offset 36 and 40), its UTF-16 name and its data; State 0x3F is the live copy."""
    data = Path(store).read_bytes()
    name = "MTC\0".encode("utf-16-le")
    at = data.find(b"\xaa\x55")
    while at >= 0:
        (name_size,) = struct.unpack_from("<I", data, at + 36)
        if data[at + 2] == 0x3F and name_size == len(name) and data[at + 60 : at + 60 + len(name)] == name:
            return int(struct.unpack_from("<I", data, at + 60 + name_size)[0])
        at = data.find(b"\xaa\x55", at + 1)
    return 0


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.fixture
async def hosts(tiny_image: Path) -> AsyncIterator[TwoHosts]:
    root = scratch("kasou-fw-")
    p = TwoHosts(
        root,
        AgentHost.make(root / "a", "a", tiny_image, NAME),
        AgentHost.make(root / "b", "b", tiny_image, NAME),
        tiny_disk(tiny_image),
        UUID,
    )
    async with serving(p):
        yield p


async def check_tpm(h: AgentHost) -> None:
    """QEMU answers ``query-tpm`` with the CRB device on the emulator backend; its swtpm runs as the VM's
    own (unprivileged) user, the user its QEMU runs as."""
    tpms = await h.qmp("query-tpm")
    assert [(t["id"], t["model"], t["options"]["type"]) for t in tpms] == [("tpm0", "tpm-crb", "emulator")], tpms
    info = await h.client.info(h.vm)
    swtpm = tpm.pid_of(h.driver.run_dir / h.vm)
    assert swtpm is not None and info.pid is not None
    assert uid_of(swtpm) == uid_of(info.pid) != 0


async def test_uefi_vm_with_a_tpm_migrates_restarts_and_is_backed_up_with_both(hosts: TwoHosts) -> None:
    p = hosts
    disk_a = qcow2_copy(p.image_disk, p.a.disks / NAME / "disk0.qcow2")
    made = await p.a.client.create_firmware(FirmwareCreate(vm=NAME, beside=str(disk_a), firmware="uefi", tpm=True))
    assert made.nvram is not None and made.tpm_state is not None
    assert sha(made.nvram) == sha(OVMF_VARS)
    ek = ek_certificate(made.tpm_state)

    # 1. It boots: OVMF loads the tiny guest's kernel from QEMU's fw_cfg, the guest writes.
    t0 = time.monotonic()
    await start_writing(p.a, spec(disk_a, made.nvram, made.tpm_state), lines=3)
    print(f"\n[uefi+tpm] ready and writing {time.monotonic() - t0:.1f} s after start")
    assert boots(OVMF_VARS) == 0 and boots(made.nvram) >= 1, "OVMF counts its boots in the VM's own store"
    await check_tpm(p.a)

    # 2. Live migration with local disks: the store is mirrored with the disk, the TPM goes in the stream.
    disk_b = p.b.disks / NAME / "disk0.qcow2"
    nvram_b, tpm_b = moved(made.nvram, made.tpm_state, str(disk_b.parent))
    assert nvram_b is not None and tpm_b is not None
    spec_b = spec(disk_b, nvram_b, tpm_b)
    inc = await p.b.client.prepare_incoming(spec_b, "copy", "127.0.0.1")
    assert set(inc.exports) == {"disk0", VARS_ID}
    assert Path(tpm_b).is_dir() and not any(Path(tpm_b).iterdir())  # an empty directory the stream fills
    await p.a.client.migrate_out(NAME, inc)

    async def completed() -> bool:
        st = await p.a.client.migration_status(NAME)
        assert st.status not in ("failed", "cancelled"), st
        return st.status == "completed"

    await wait_for("the migration to complete", completed, 120)
    at_cut = sha(made.nvram)  # the source is paused for good: its store is final
    await p.b.client.finish_incoming(NAME)
    await p.a.client.finish_out(NAME)
    assert sha(nvram_b) == at_cut and boots(nvram_b) == boots(made.nvram)
    assert ek in permall(tpm_b), "the destination's TPM is the same TPM"
    assert swtpm_pids(p.a.root) == []  # the source's swtpm ended with its QEMU
    await writes_go_on(p.b, more=5)
    await check_tpm(p.b)

    # 3. A stop ends its swtpm; a start brings the same TPM and variables back.
    await p.b.client.action(NAME, "stop")
    assert swtpm_pids(p.b.root) == []
    await p.b.client.forget(NAME)
    booted = boots(nvram_b)
    await start_writing(p.b, spec_b, lines=len(p.b.seqs()) + 3)
    assert ek in permall(tpm_b)
    await check_tpm(p.b)
    info = await p.b.client.info(NAME)
    assert info.state == RuntimeState.RUNNING and boots(nvram_b) >= booted + 1, "the store was kept, not renewed"

    # 4. A backup of the running VM carries the store (in the disks' transaction) and the TPM's state.
    sources = [
        BackupSource(disk_id="disk0", path=str(disk_b)),
        BackupSource(disk_id=VARS_ID, path=nvram_b, format="raw"),
    ]
    bk = await p.b.client.create_backup(
        NAME, BackupCreate(generation=1, backup_id="fw01", disks=sources, tpm_state=tpm_b)
    )
    assert bk.running and bk.tpm is not None
    files = {f.disk_id: f for f in bk.files}
    restored = {}
    for disk_id, fmt in (("disk0", "qcow2"), (VARS_ID, "raw")):
        req = BackupRestore(vm="fw1r", disk_id=disk_id, path=files[disk_id].path, digest=files[disk_id].digest,
                            format=fmt)  # type: ignore[arg-type]  # fmt: skip
        restored[disk_id] = (await p.b.client.restore_backup(req)).path
    assert Path(restored[VARS_ID]).name == "efivars.fd" and sha(restored[VARS_ID]) == sha(nvram_b)
    tpm_r = await p.b.client.restore_tpm_backup(
        TpmRestore(path=bk.tpm.path, digest=bk.tpm.digest, beside=restored["disk0"])
    )
    assert tpm_r.tpm_state is not None and ek in permall(tpm_r.tpm_state)

    # 5. swtpm ends with its QEMU by itself (--terminate), also when QEMU is killed and no agent watches.
    await p.b.driver.close()
    assert info.pid is not None and swtpm_pids(p.b.root)
    os.kill(info.pid, signal.SIGKILL)
    await wait_for("swtpm to end with its QEMU", lambda: _none_left(p.b.root), 15)


async def _none_left(root: Path) -> bool:
    return swtpm_pids(root) == []


@pytest.mark.scenario
async def test_start_time_bios_and_uefi(tiny_image: Path) -> None:
    """The tiny guest, from the start request to its readiness (its first heartbeat), three times under
    each firmware in turn, on the same host in the same run; both with 256 MiB. A measurement (half a minute),
    not a check: a scenario (``pytest -m scenario``); UEFI boots are checked by the other tests here."""
    root = scratch("kasou-fwt-")
    h = AgentHost.make(root, "h", tiny_image, NAME)
    times: dict[str, list[float]] = {"bios": [], "uefi": []}
    await h.driver.attach_all()
    try:
        for i in range(3):
            for firmware in ("bios", "uefi"):
                vm = f"t{firmware[0]}{i}"
                disk = qcow2_copy(tiny_disk(tiny_image), h.disks / vm / "disk0.qcow2")
                nvram = None
                if firmware == "uefi":
                    nvram = (await h.client.create_firmware(
                        FirmwareCreate(vm=vm, beside=str(disk), firmware="uefi")
                    )).nvram  # fmt: skip
                s = spec(disk, nvram, None, firmware, name=vm)
                t0 = time.monotonic()
                await h.client.start(s)

                async def ready(vm: str = vm) -> bool:
                    return (await h.client.info(vm)).guest_ready

                await wait_for(f"{vm} to be ready", ready, 90)
                times[firmware].append(time.monotonic() - t0)
                await h.client.action(vm, "stop")
                await h.client.forget(vm)
    finally:
        await h.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)
    med = {f: statistics.median(t) for f, t in times.items()}
    print(
        f"\n[start time, tiny guest, {MEMORY} MiB, TCG] bios median {med['bios']:.2f} s "
        f"({', '.join(f'{t:.2f}' for t in times['bios'])}); uefi median {med['uefi']:.2f} s "
        f"({', '.join(f'{t:.2f}' for t in times['uefi'])})"
    )
    assert all(len(t) == 3 for t in times.values())


async def test_shared_storage_keeps_one_variable_store_and_moves_the_tpm_to_a_new_directory(hosts: TwoHosts) -> None:
    """Disk and variable store on storage both hosts see: both QEMUs open the one store (the destination only
    once it runs); the destination's swtpm runs on a new directory beside the old one (swtpm locks its own)."""
    p = hosts
    home = p.root / "shared" / NAME
    disk = qcow2_copy(p.image_disk, home / "disk0.qcow2")
    nvram = home / "efivars.fd"
    fw.make_vars(nvram, "uefi", p.a.driver.ovmf_dir)
    await tpm.manufacture(home / "tpm")
    ek = ek_certificate(home / "tpm")
    await start_writing(p.a, spec(disk, str(nvram), str(home / "tpm")), lines=3)
    booted = boots(nvram)
    same_nvram, tpm_b = moved(str(nvram), str(home / "tpm"), None)
    assert same_nvram == str(nvram) and tpm_b == str(home / "tpm-2")
    inc = await p.b.driver.prepare_incoming(spec(disk, str(nvram), tpm_b), "shared", "127.0.0.1")
    await p.a.driver.migrate_out(NAME, inc)

    async def completed() -> bool:
        st = await p.a.driver.migration_status(NAME)
        assert st.status not in ("failed", "cancelled"), st
        return st.status == "completed"

    await wait_for("the migration to complete", completed, 120)
    await p.b.driver.finish_incoming(NAME)
    await p.a.driver.finish_out(NAME)
    assert ek in permall(tpm_b) and swtpm_pids(p.a.root) == []
    await writes_go_on(p.b, more=5)
    await check_tpm(p.b)
    assert boots(nvram) == booted  # the one store, as the guest left it (no reboot)
    await p.b.driver.stop(NAME)


async def test_qemu_takes_the_windows_command_line(tiny_image: Path) -> None:
    """No Windows image here: the tiny guest under ``--os windows``'s settings (Secure Boot, a TPM, Hyper-V
    enlightenments, the clock in local time) shows that QEMU on this host takes them and boots."""
    root = scratch("kasou-fww-")
    h = AgentHost.make(root, "h", tiny_image, "win1")
    await h.driver.attach_all()
    try:
        disk = qcow2_copy(tiny_disk(tiny_image), h.disks / "win1" / "disk0.qcow2")
        made = await h.client.create_firmware(FirmwareCreate(vm="win1", beside=str(disk), firmware="uefi-secure",
                                                             tpm=True))  # fmt: skip
        s = spec(disk, made.nvram, made.tpm_state, "uefi-secure", name="win1").model_copy(
            update={"os": "windows", "cpu": "x86-64-v2-AES"}
        )
        await start_writing(h, s, lines=1, what="the guest under Windows' settings to write")
        argv = Path(f"/proc/{(await h.client.info('win1')).pid}/cmdline").read_bytes().split(b"\0")
        assert b"base=localtime" in argv and any(b",hv_relaxed," in a for a in argv)
        await check_tpm(h)
        await h.client.action("win1", "stop")
    finally:
        await h.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)


def test_through_kasou(kasou: Kasou) -> None:
    """The whole stack: vm create --firmware uefi --tpm --start, vm show, a refusal of one line, vm delete."""
    r = kasou.run("vm", "create", "w", "--image", "tiny", "--os", "windows", "--firmware", "bios", check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --os windows needs --firmware uefi-secure")
    assert len(r.stderr.strip().splitlines()) == 1 and kasou.json("vm", "list") == []
    kasou.run("vm", "create", "emr1", "--image", "tiny", "--memory", "256", "--firmware", "uefi", "--tpm", "--start",
              timeout=180)  # fmt: skip
    vm = kasou.wait_ready("emr1", timeout=120)
    assert (vm["firmware"], vm["tpm"]) == ("uefi", True)
    assert Path(vm["nvram"]).is_file() and (Path(vm["tpm_state"]) / "tpm2-00.permall").is_file()
    assert "firmware      uefi, TPM 2.0" in kasou.run("vm", "show", "emr1").stdout
    kasou.run("vm", "stop", "emr1")
    kasou.run("vm", "delete", "emr1")
    assert not Path(vm["nvram"]).parent.exists()


async def test_a_memory_snapshot_resumes_with_its_variables_and_its_tpm(tiny_image: Path) -> None:
    """Revert to a snapshot with memory: QEMU restores the flash and the TPM's state with the guest's memory
    (swtpm takes the state back; the variables are those of that instant); the guest goes on, no reboot."""
    root = scratch("kasou-fws-")
    h = AgentHost.make(root, "h", tiny_image, NAME)
    await h.driver.attach_all()
    try:
        disk = qcow2_copy(tiny_disk(tiny_image), h.disks / NAME / "disk0.qcow2")
        made = await h.client.create_firmware(FirmwareCreate(vm=NAME, beside=str(disk), firmware="uefi", tpm=True))
        assert made.nvram is not None and made.tpm_state is not None
        s = spec(disk, made.nvram, made.tpm_state)
        await start_writing(h, s, lines=3)
        booted = boots(made.nvram)
        take = SnapshotTake(snapshot="m1", disks=[SnapshotDiskNow(id="disk0", path=str(disk))], memory=True)
        m1 = await h.client.take_snapshot(NAME, take)
        assert m1.memory_path is not None
        await writes_go_on(h, more=5)
        await h.client.action(NAME, "stop")
        await h.client.forget(NAME)
        await h.client.revert_snapshot(NAME, SnapshotRevert(disks=m1.disks))
        overlay = LaunchDisk(id="disk0", path=m1.disks[0].overlay, size_bytes=DISK_SIZE)
        info = await h.client.restore(NAME, s.model_copy(update={"disks": [overlay]}), m1.memory_path)
        assert info.state == RuntimeState.RUNNING
        await wait_for("the restored guest to write", lambda: _writes(h), 60)
        assert "KASOU-READY" not in h.log(), "the guest went on from the saved instant, it did not boot"
        assert boots(made.nvram) == booted
        await check_tpm(h)
        await h.client.action(NAME, "stop")
    finally:
        await h.close()
        await end_processes(root)
        shutil.rmtree(root, ignore_errors=True)


async def _writes(h: AgentHost) -> bool:
    return len(h.seqs()) >= 3
