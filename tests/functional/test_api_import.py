"""vm import and export through the API: the fake hypervisor, real qemu-img conversions of real files.

Every refusal is checked for one clear line and nothing left behind: no VM record, no disk file, no
job still running, no file in the transfer directory but the test's own.
"""

from __future__ import annotations

import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import Env
from tests.ovf_samples import SERIAL_PORT, TAPE_DRIVE, Disk, make_ova, raw_disk, vmdk, vmware_ovf


@pytest.fixture
def transfer(env: Env) -> Path:
    d = env.tmp / "transfer"  # the agent's default: beside its disk directory
    d.mkdir(exist_ok=True)
    return d


def convert(src: Path, out: Path, fmt: str, *opts: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *opts, str(src), str(out)], check=True)
    return out


def same(a: str | Path, a_fmt: str, b: str | Path, b_fmt: str = "qcow2") -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", a_fmt, "-F", b_fmt, str(a), str(b)], check=False)
    return r.returncode == 0


def start_import(env: Env, name: str, **kw: Any) -> Any:
    return env.api.post("/v1/imports", json={"name": name, "memory_mib": 128, **kw})


def do_import(env: Env, name: str, **kw: Any) -> dict[str, Any]:
    r = start_import(env, name, **kw)
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded", job
    return dict(r.json())


def refused(env: Env, transfer: Path, name: str, status: int, **kw: Any) -> str:
    """The import is refused at once with one line, and leaves nothing."""
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, name, **kw)
    assert r.status_code == status, r.text
    msg = str(r.json()["message"])
    assert "\n" not in msg
    nothing_left(env, transfer, before)
    return msg


def nothing_left(env: Env, transfer: Path, before: list[str]) -> None:
    assert env.api.get("/v1/vms").json() == []
    assert not [p for p in (env.tmp / "disks").rglob("*") if p.is_file()]
    assert all(j["state"] in ("succeeded", "failed") for j in env.api.get("/v1/jobs").json())
    assert sorted(p.name for p in transfer.iterdir()) == before


# -- disk files -------------------------------------------------------------------------------------


def test_every_disk_format_imports_as_qcow2_in_boot_order(env: Env, transfer: Path) -> None:
    src = raw_disk(transfer / "src.raw")
    files = {
        "a.qcow2": convert(src, transfer / "a.qcow2", "qcow2"),
        "b.vmdk": convert(src, transfer / "b.vmdk", "vmdk", "-o", "subformat=monolithicSparse"),
        "c.vmdk": convert(src, transfer / "c.vmdk", "vmdk", "-o", "subformat=streamOptimized"),
        "d.vmdk": convert(src, transfer / "d.vmdk", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"),
        "e.vhd": convert(src, transfer / "e.vhd", "vpc", "-o", "force_size=on"),
        "f.vhdx": convert(src, transfer / "f.vhdx", "vhdx"),
        "src.raw": src,
    }
    res = do_import(env, "legacy", disks=list(files))
    lines = res["report"]["lines"]
    assert any("b.vmdk (vmdk monolithicSparse, 8 MiB)" in ln for ln in lines), lines
    assert any("d.vmdk (vmdk twoGbMaxExtentSparse" in ln for ln in lines), lines
    assert any("e.vhd (vhd, 8 MiB)" in ln for ln in lines), lines
    assert any(ln.startswith("firmware  BIOS") for ln in lines), lines
    vm = env.api.get("/v1/vms/legacy").json()
    assert vm["state"] == "stopped" and vm["image"] is None and vm["memory_mib"] == 128
    assert [d["id"] for d in vm["disks"]] == [f"disk{i}" for i in range(7)]
    for d in vm["disks"]:
        assert d["format"] == "qcow2" and d["size_bytes"] == 8 << 20
        assert same(src, "raw", d["path"]), d
    assert [n["id"] for n in vm["nics"]] == ["net0"]
    history = env.api.get("/v1/vms/legacy/history").json()
    assert history[-1]["event"] == "defined" and "imported from a.qcow2" in history[-1]["detail"]
    assert (transfer / "c.vmdk").exists()  # the source is left as it was


def test_an_imported_vm_boots_its_own_disk_through_the_firmware(env: Env, transfer: Path) -> None:
    vmdk(raw_disk(transfer / "x.raw"), transfer / "boot.vmdk")
    do_import(env, "web", disks=["boot.vmdk", "x.raw"], start=True, vcpus=2)
    vm = env.api.get("/v1/vms/web").json()
    assert vm["state"] == "running" and vm["vcpus"] == 2
    spec = env.driver.specs["web"]
    assert spec.image is None  # no kernel of kasou's: the firmware boots disk0
    assert [d.id for d in spec.disks] == ["disk0", "disk1"]


def test_a_path_is_taken_from_the_transfer_directory_and_only_from_there(env: Env, transfer: Path) -> None:
    raw_disk(env.tmp / "outside.raw")
    msg = refused(env, transfer, "x", 422, disks=[str(env.tmp / "outside.raw")])
    assert "is not in the transfer directory of host host1" in msg, msg
    msg = refused(env, transfer, "x", 422, disks=["../outside.raw"])
    assert "is not in the transfer directory" in msg, msg
    (transfer / "link.raw").symlink_to(env.tmp / "outside.raw")
    msg = refused(env, transfer, "x", 422, disks=["link.raw"])
    assert "is not in the transfer directory" in msg, msg
    msg = refused(env, transfer, "x", 404, disks=["missing.vmdk"])
    assert msg.startswith("no disk file missing.vmdk in the transfer directory of host host1"), msg
    do_import(env, "abs", disks=[str(raw_disk(transfer / "in.raw"))])  # an absolute path inside is fine


def test_bad_disk_files_are_refused_with_one_line_each(env: Env, transfer: Path) -> None:
    src = raw_disk(transfer / "s.raw")
    good = convert(src, transfer / "good.vmdk", "vmdk")
    corrupt = transfer / "corrupt.vmdk"
    data = bytearray(good.read_bytes())
    data[4:64] = b"\xff" * 60  # the sparse header's version, flags, capacity and grain fields
    corrupt.write_bytes(bytes(data))
    msg = refused(env, transfer, "x", 422, disks=["corrupt.vmdk"])
    assert msg.startswith("corrupt.vmdk cannot be read as a vmdk image: "), msg
    (transfer / "notes.vmdk").write_text("meeting notes\n" * 100)
    msg = refused(env, transfer, "x", 422, disks=["notes.vmdk"])
    assert msg == "notes.vmdk is not a vmdk image: it has no vmdk header (a corrupt file, or no disk image)", msg
    (transfer / "notes.txt").write_text("meeting notes\n")
    msg = refused(env, transfer, "x", 422, disks=["notes.txt"])
    assert "no disk image kasou recognises" in msg, msg
    (transfer / "odd.raw").write_bytes(b"x" * 1000)
    msg = refused(env, transfer, "x", 422, disks=["odd.raw"])
    assert "not a whole number of 512-byte sectors" in msg, msg
    convert(src, transfer / "named.vhd", "qcow2")
    msg = refused(env, transfer, "x", 422, disks=["named.vhd"])
    assert msg == "named.vhd is named .vhd but holds a qcow2 image; rename it", msg


def test_images_that_name_other_files_are_refused(env: Env, transfer: Path) -> None:
    base = convert(raw_disk(transfer / "base.raw"), transfer / "base.qcow2", "qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(transfer / "overlay.qcow2")], check=True)  # fmt: skip
    msg = refused(env, transfer, "x", 422, disks=["overlay.qcow2"])
    assert "is a qcow2 overlay with a backing file" in msg, msg
    flat = convert(raw_disk(transfer / "f.raw"), transfer / "flat.vmdk", "vmdk", "-o", "subformat=monolithicFlat")
    text = flat.read_text(errors="replace").replace('"flat-flat.vmdk"', '"/etc/passwd"')
    (transfer / "evil.vmdk").write_text(text)
    msg = refused(env, transfer, "x", 422, disks=["evil.vmdk"])
    assert "names extent '/etc/passwd'; its extents must be plain files beside it" in msg, msg
    do_import(env, "flat", disks=["flat.vmdk"])  # a split vmdk with its extent beside it is fine


def test_a_name_that_exists_and_a_pool_without_room_are_refused(env: Env, transfer: Path) -> None:
    raw_disk(transfer / "a.raw")
    env.create("emr")
    r = start_import(env, "emr", disks=["a.raw"])
    assert r.status_code == 409 and r.json()["message"] == "a VM named 'emr' already exists", r.text
    env.api.delete("/v1/vms/emr")
    env.wait(env.api.get("/v1/jobs").json()[-1])
    assert env.api.post("/v1/pools", json={"name": "small", "path": str(env.tmp / "p-small"),
                                           "capacity": "4M"}).status_code == 201  # fmt: skip
    msg = refused(env, transfer, "big", 409, disks=["a.raw"], pool="small")
    assert "pool 'small'" in msg and "8 MiB requested" in msg and "limit of 4 MiB" in msg, msg
    assert not list((env.tmp / "p-small").rglob("*.qcow2"))


def test_a_uefi_import_gets_its_own_variable_store_and_tpm_beside_its_boot_disk(env: Env, transfer: Path) -> None:
    raw_disk(transfer / "a.raw")
    msg = refused(env, transfer, "x", 422, disks=["a.raw"], firmware="uefi", memory_mib=128)
    assert "UEFI needs at least 256 MiB" in msg, msg
    res = do_import(env, "uefi-vm", disks=["a.raw"], firmware="uefi-secure", tpm=True, memory_mib=512)
    lines = res["report"]["lines"]
    assert "firmware  UEFI with Secure Boot (given)" in lines and "tpm       TPM 2.0 (given)" in lines, lines
    vm = env.api.get("/v1/vms/uefi-vm").json()
    assert vm["firmware"] == "uefi-secure", vm
    beside = Path(vm["disks"][0]["path"]).parent
    assert sorted(p.name for p in beside.iterdir() if p.name != "disk0.qcow2"), list(beside.iterdir())
    env.act("uefi-vm", "start")
    spec = env.driver.specs["uefi-vm"]
    assert spec.firmware == "uefi-secure" and spec.nvram and spec.tpm_state, spec
    env.act("uefi-vm", "stop")
    r = env.api.post("/v1/vms/uefi-vm/export", json={"ova": "uefi.ova"})  # and back: it stays UEFI, Secure Boot
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded", r.text
    back = do_import(env, "uefi-back", ova="uefi.ova", memory_mib=None)
    assert any(ln.startswith("firmware  UEFI with Secure Boot (the OVF") for ln in back["report"]["lines"]), back


# -- OVA and OVF --------------------------------------------------------------------------------------


def ova_of(transfer: Path, name: str = "emr-db.ova", **kw: Any) -> Path:
    d1 = vmdk(raw_disk(transfer / "d1.raw", marker=b"SYSTEM"), transfer / "emr-db-disk1.vmdk")
    d2 = vmdk(raw_disk(transfer / "d2.raw", size_mib=4, marker=b"DATA"), transfer / "emr-db-disk2.vmdk")
    disks = kw.pop("disks", [Disk(d2.name, d2.stat().st_size, 4 / 1024, address=1),
                             Disk(d1.name, d1.stat().st_size, 8 / 1024, address=0)])  # fmt: skip
    files = kw.pop("files", [(d1.name, d1), (d2.name, d2)])
    path = make_ova(transfer / name, vmware_ovf(disks=disks, **kw), files)
    for f in (d1, d2):
        f.unlink()
    return path


def test_an_ova_from_vmware_imports_with_a_report(env: Env, transfer: Path) -> None:
    ova_of(transfer, nics=("VM Network", "PACS VLAN"))
    res = do_import(env, "emr-db", ova="emr-db.ova")
    lines = res["report"]["lines"]
    text = "\n".join(lines)
    assert "vCPUs     2 (the OVF)" in text and "memory    128 MiB (given; the OVF says 2048 MiB)" in text, text
    assert "firmware  BIOS (the OVF: vmw:Config firmware=bios)" in text, text
    assert "os        Debian GNU/Linux 11 (64-bit), vmw:osType debian11_64Guest" in text, text
    # disk order: SCSI 0:0 (the system disk) first, though the OVF lists it second
    assert "disk0     emr-db-disk1.vmdk (vmdk streamOptimized, 8 MiB) at SCSI 0:0" in text, text
    assert "disk1     emr-db-disk2.vmdk (vmdk streamOptimized, 4 MiB) at SCSI 0:1" in text, text
    assert "net0      E1000e Ethernet adapter 'Network adapter 1' on OVF network 'VM Network' -> virtio-net on " \
           "network user" in text, text  # fmt: skip
    assert "net1      VmxNet3 Ethernet adapter 'Network adapter 2' on OVF network 'PACS VLAN'" in text, text
    assert "left out  CD drive 'CD/DVD drive 1' (empty)" in text, text
    assert "left out  USB controller 'USB controller' (vmware.usb.ehci)" in text, text
    assert "left out  other device 'VMCI device' (vmware.vmci)" in text, text
    vm = env.api.get("/v1/vms/emr-db").json()
    assert vm["vcpus"] == 2 and [n["network"] for n in vm["nics"]] == ["user", "user"]
    d0, d1 = vm["disks"]
    assert same(transfer / "d1.raw", "raw", d0["path"]) and same(transfer / "d2.raw", "raw", d1["path"])
    assert d0["size_bytes"] == 8 << 20 and d1["size_bytes"] == 4 << 20


def test_an_ovf_with_its_disks_beside_it_imports(env: Env, transfer: Path) -> None:
    sub = transfer / "appliance"
    sub.mkdir()
    d = vmdk(raw_disk(sub / "s.raw"), sub / "emr-db-disk1.vmdk")
    (sub / "emr-db.ovf").write_text(vmware_ovf(disks=[Disk(d.name, d.stat().st_size, 8 / 1024)], memory_mib=256))
    res = do_import(env, "ovf1", ovf="appliance/emr-db.ovf", memory_mib=None)
    assert "memory    256 MiB (the OVF)" in res["report"]["lines"], res["report"]["lines"]
    vm = env.api.get("/v1/vms/ovf1").json()
    assert same(sub / "s.raw", "raw", vm["disks"][0]["path"])


def test_bad_packages_are_refused_with_one_line_each(env: Env, transfer: Path) -> None:
    d = vmdk(raw_disk(transfer / "s.raw"), transfer / "disk.vmdk")
    ovf = vmware_ovf(disks=[Disk("disk.vmdk", d.stat().st_size, 8 / 1024)])
    make_ova(transfer / "missing.ova", ovf, [])
    msg = refused(env, transfer, "x", 422, ova="missing.ova")
    assert msg == "missing.ova has no member 'disk.vmdk', the file of disk 'vmdisk1'", msg
    escape = tarfile.TarInfo("../../etc/cron.d/evil")
    escape.size = 4
    make_ova(transfer / "escape.ova", ovf, [("disk.vmdk", d)], extra=[escape])
    msg = refused(env, transfer, "x", 422, ova="escape.ova")
    assert "member '../../etc/cron.d/evil' would land outside the archive's directory" in msg, msg
    link = tarfile.TarInfo("disk2.vmdk")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    make_ova(transfer / "link.ova", ovf, [("disk.vmdk", d)], extra=[link])
    msg = refused(env, transfer, "x", 422, ova="link.ova")
    assert msg == "link.ova: member 'disk2.vmdk' is a link; an OVA holds files only", msg
    make_ova(transfer / "odd.ova", vmware_ovf(disks=[Disk("disk.vmdk", 1, 8 / 1024)],
                                              extra_items=SERIAL_PORT + TAPE_DRIVE), [("disk.vmdk", d)])  # fmt: skip
    msg = refused(env, transfer, "x", 422, ova="odd.ova")
    assert msg == (
        "cannot import 'x' from odd.ova: serial port 'Serial port 1' (ResourceType 21) has no counterpart "
        "in kasou; tape drive 'Tape drive 1' (ResourceType 18) has no counterpart in kasou"
    ), msg
    make_ova(transfer / "efi.ova", vmware_ovf(disks=[Disk("disk.vmdk", 1, 8 / 1024)], firmware="efi",
                                              secure_boot=True), [("disk.vmdk", d)])  # fmt: skip
    msg = refused(env, transfer, "x", 422, ova="efi.ova", memory_mib=128)
    assert "UEFI needs at least 256 MiB" in msg, msg
    (transfer / "plain.ova").write_text("not a tar")
    msg = refused(env, transfer, "x", 422, ova="plain.ova")
    assert msg.startswith("plain.ova is "), msg


def test_an_ova_whose_disk_does_not_match_its_manifest_fails_and_leaves_nothing(env: Env, transfer: Path) -> None:
    path = ova_of(transfer, "bad.ova")
    blob = bytearray(path.read_bytes())
    pos = blob.rfind(b"KDMV")  # the second disk's header: flip a byte of its data further on
    blob[pos + 70000] ^= 0xFF
    path.write_bytes(bytes(blob))
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, "bad", ova="bad.ova")
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "failed"
    assert "does not match the OVF manifest (SHA256" in job["error"]["message"], job
    nothing_left(env, transfer, before)


# -- export ---------------------------------------------------------------------------------------------


def test_an_exported_ova_imports_back_the_same(env: Env, transfer: Path) -> None:
    src = raw_disk(transfer / "sys.raw", marker=b"ROUNDTRIP")
    do_import(env, "pharmacy", disks=["sys.raw", str(raw_disk(transfer / "data.raw", 4))], vcpus=1)
    r = env.api.post("/v1/vms/pharmacy/export", json={"ova": "pharmacy.ova"})
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded", job
    assert job["result"]["file"] == str((transfer / "pharmacy.ova").resolve())
    with tarfile.open(transfer / "pharmacy.ova") as tar:
        names = tar.getnames()
        mf = tar.extractfile("pharmacy.mf").read().decode()  # type: ignore[union-attr]
    assert names == ["pharmacy.ovf", "pharmacy.mf", "pharmacy-disk0.vmdk", "pharmacy-disk1.vmdk"]
    assert mf.startswith("SHA256(pharmacy.ovf)= ") and mf.count("SHA256(") == 3
    assert not [p for p in transfer.iterdir() if p.name.startswith(".")]  # no scratch files left
    res = do_import(env, "pharmacy2", ova="pharmacy.ova", memory_mib=None)
    assert "vCPUs     1 (the OVF)" in res["report"]["lines"]
    a, b = env.api.get("/v1/vms/pharmacy").json(), env.api.get("/v1/vms/pharmacy2").json()
    assert b["memory_mib"] == a["memory_mib"] and len(b["nics"]) == len(a["nics"])
    for da, db in zip(a["disks"], b["disks"], strict=True):
        assert same(da["path"], "qcow2", db["path"])
    assert same(src, "raw", b["disks"][0]["path"])


def test_export_is_refused_for_a_running_vm_or_an_existing_file(env: Env, transfer: Path) -> None:
    raw_disk(transfer / "a.raw")
    do_import(env, "lab", disks=["a.raw"], start=True)
    r = env.api.post("/v1/vms/lab/export", json={"ova": "lab.ova"})
    assert r.status_code == 409 and "only a stopped VM can be exported" in r.json()["message"], r.text
    env.act("lab", "stop")
    (transfer / "lab.ova").write_text("mine")
    r = env.api.post("/v1/vms/lab/export", json={"ova": "lab.ova"})
    assert r.status_code == 422 and r.json()["message"] == "lab.ova already exists on host host1; choose another name"
    assert (transfer / "lab.ova").read_text() == "mine"
    assert env.api.get("/v1/vms/lab").json()["job"] is None  # the VM is not left held
    r = env.api.post("/v1/vms/lab/export", json={"ova": "../lab.ova"})
    assert r.status_code == 422 and "is not in the transfer directory" in r.json()["message"], r.text


def test_a_vmdk_that_breaks_during_the_conversion_fails_the_job_and_leaves_nothing(env: Env, transfer: Path) -> None:
    good = vmdk(raw_disk(transfer / "s.raw", size_mib=16), transfer / "good.vmdk")
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = b"\x5a" * 4096  # inside the compressed grains
    (transfer / "broken.vmdk").write_bytes(bytes(data[: len(data) - 1024]))
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, "broken", disks=["s.raw", "broken.vmdk"])
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "failed" and job["error"]["message"].startswith("cannot convert broken.vmdk (vmdk): ")
    nothing_left(env, transfer, before)  # disk0, converted already, is gone too


def test_a_cancelled_import_stops_the_conversion_and_leaves_nothing(
    env: Env, transfer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from kasou.agent import transfers

    started: list[list[str]] = []

    async def slow(argv: list[str], progress: Any) -> None:  # qemu-img on a very large disk
        started.append(argv)
        Path(argv[-1]).write_bytes(b"partial")
        await progress(0.3)
        await asyncio.sleep(60)

    monkeypatch.setattr(transfers, "run_with_progress", slow)
    raw_disk(transfer / "a.raw")
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, "big", disks=["a.raw"])
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    deadline = time.monotonic() + 10
    while env.api.get(f"/v1/jobs/{job['id']}").json()["progress"] < 0.25:
        assert time.monotonic() < deadline, "the conversion's progress never showed"
    assert started and started[0][:3] == ["qemu-img", "convert", "-p"]
    c = env.api.post(f"/v1/jobs/{job['id']}/cancel")
    assert c.status_code == 200 and c.json()["state"] == "failed", c.text
    assert c.json()["error"]["code"] == "cancelled"
    nothing_left(env, transfer, before)


def test_a_vendor_imports_into_their_department_only_and_exports_only_their_vms(env: Env, transfer: Path) -> None:
    from tests.functional.test_api_tenancy import CSRF, vendor

    raw_disk(transfer / "a.raw")
    lab = vendor(env, "lv", "lab")  # inside a maintenance window granting operate (outside: test_window_matrix.py)
    r = lab.post("/v1/imports", json={"name": "lis", "disks": ["a.raw"], "memory_mib": 128}, headers=CSRF)
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    assert env.api.get("/v1/vms/lis").json()["department"] == "lab"  # their one department, by default
    r = lab.post("/v1/imports", json={"name": "ris", "disks": ["a.raw"], "department": "radiology"}, headers=CSRF)
    assert r.status_code == 403 and "may import VMs of their departments only (lab)" in r.json()["message"], r.text
    env.create("pacs", department="radiology")
    r = lab.post("/v1/vms/pacs/export", json={"ova": "pacs.ova"}, headers=CSRF)
    assert r.status_code == 404, r.text  # another department's VM is as if it did not exist
    assert not (transfer / "pacs.ova").exists()


def test_an_imported_vm_gets_a_pinned_machine_type_and_the_default_cpu(env: Env, transfer: Path) -> None:
    raw_disk(transfer / "a.raw")
    res = do_import(env, "pinned", disks=["a.raw"])
    assert "cpu       x86-64-v2-AES, machine pc-q35-7.2" in res["report"]["lines"], res["report"]["lines"]
    do_import(env, "chosen", disks=["a.raw"], cpu="x86-64-v3", machine="pc-q35-7.1", start=True)
    spec = env.driver.specs["chosen"]
    assert (spec.cpu, spec.machine) == ("x86-64-v3", "pc-q35-7.1")
