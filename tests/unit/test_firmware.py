"""Firmware, TPM and OS type: the rules on what a VM may ask, and the QEMU and swtpm command lines."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from kasou.agent import firmware as agent_fw
from kasou.errors import AlreadyExists, BackupCorrupt, HypervisorError, InvalidSpec
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu import firmware as fw
from kasou.hypervisor.qemu import tpm
from kasou.hypervisor.qemu.blocknodes import top_of
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.model.firmware import HYPERV_FLAGS, alternate, check_storage, check_template, moved, resolve
from kasou.model.spec import VMCreate, VMUpdate

FILES = RuntimeFiles(dir=Path("/run/k/win1"), serial_log=Path("/log/win1.log"))
BOOT = BootFiles(Path("/img/vmlinuz"), Path("/img/initrd"), "console=ttyS0")
CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")


def spec(**kw: object) -> LaunchSpec:
    base: dict[str, object] = dict(
        name="win1",
        uuid="00000000-0000-0000-0000-000000000009",
        vcpus=2,
        memory_mib=4096,
        cpu="x86-64-v2-AES",
        machine="pc-q35-7.2",
        disks=[LaunchDisk(id="disk0", path="/d/win1/disk0.qcow2")],
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- what may be asked ------------------------------------------------------------------------


def test_defaults_and_windows_brings_secure_boot_and_a_tpm() -> None:
    assert resolve(None, None, None) == ("bios", False, None)
    assert resolve("uefi", None, "linux") == ("uefi", False, "linux")
    assert resolve(None, True, None) == ("bios", True, None)  # SeaBIOS drives a TPM too
    assert resolve(None, None, "windows") == ("uefi-secure", True, "windows")
    assert resolve("uefi-secure", True, "windows") == ("uefi-secure", True, "windows")


@pytest.mark.parametrize(
    ("firmware", "tpm", "os", "field", "words"),
    [
        ("efi", None, None, "firmware", "firmware must be one of bios, uefi, uefi-secure, not 'efi'"),
        (None, None, "win11", "os", "os must be one of linux, windows, other"),
        ("bios", None, "windows", "firmware", "--os windows needs --firmware uefi-secure, not bios"),
        ("uefi", None, "windows", "firmware", "--os windows needs --firmware uefi-secure, not uefi"),
        (None, False, "windows", "tpm", "--os windows needs a TPM"),
    ],
)
def test_combinations_that_cannot_work_are_one_line(
    firmware: str | None, tpm: bool | None, os: str | None, field: str, words: str
) -> None:
    with pytest.raises(InvalidSpec) as e:
        resolve(firmware, tpm, os)
    assert e.value.details["field"] == field and words in e.value.message and "\n" not in e.value.message


def test_state_kept_in_one_place_is_refused_where_disks_are_kept_twice() -> None:
    check_storage("bios", False, "replicated", False)
    check_storage("uefi", True, "shared", False)
    with pytest.raises(InvalidSpec, match="a replicated VM cannot have UEFI variables and a TPM yet"):
        check_storage("uefi", True, "replicated", False)
    with pytest.raises(InvalidSpec, match="mirrored disk cannot have a TPM yet"):
        check_storage("bios", True, "local", True)


def test_a_linked_clone_has_its_templates_firmware() -> None:
    check_template("t", ("uefi", True, None), (None, None, None))
    check_template("t", ("uefi", True, None), ("uefi", True, None))
    with pytest.raises(InvalidSpec, match=r"template's firmware \(t: uefi\)"):
        check_template("t", ("uefi", True, None), ("bios", None, None))
    with pytest.raises(InvalidSpec, match=r"template's tpm \(t: on\)"):
        check_template("t", ("uefi", True, None), (None, False, None))


def test_vm_create_checks_the_combination_and_vm_set_refuses_firmware() -> None:
    base = {"name": "w", "image": "tiny"}
    assert VMCreate.parse({**base, "os": "windows", "cpu": "qemu64"}).os == "windows"
    VMCreate.parse({**base, "firmware": "uefi-secure", "cpu": "qemu64"})  # Secure Boot on QEMU's plain CPU: fine
    with pytest.raises(InvalidSpec, match="needs a TPM"):
        VMCreate.parse({**base, "os": "windows", "tpm": False})
    with pytest.raises(InvalidSpec, match="tpm: Input should be a valid boolean"):
        VMCreate.parse({**base, "tpm": "yes"})
    with pytest.raises(InvalidSpec, match="firmware, tpm cannot change after a VM is created") as e:
        VMUpdate.parse({"firmware": "uefi", "tpm": True})
    assert e.value.details["field"] == "firmware"


def test_migration_names_alternate_so_two_copies_never_collide() -> None:
    assert alternate("/p/vm/efivars.fd") == "/p/vm/efivars-2.fd"
    assert alternate("/p/vm/efivars-2.fd") == "/p/vm/efivars.fd"
    assert alternate("/p/vm/tpm") == "/p/vm/tpm-2" and alternate("/p/vm/tpm-2") == "/p/vm/tpm"
    # Local disks: both go to the destination's VM directory.
    assert moved("/a/vm/efivars.fd", "/a/vm/tpm", "/b/vm") == ("/b/vm/efivars-2.fd", "/b/vm/tpm-2")
    # Shared storage: the variables stay; the TPM gets a new directory beside the old one.
    assert moved("/s/vm/efivars.fd", "/s/vm/tpm-2", None) == ("/s/vm/efivars.fd", "/s/vm/tpm")
    assert moved(None, None, "/b/vm") == (None, None)


# -- QEMU's command line -------------------------------------------------------------------------


def test_bios_has_no_flash_and_no_tpm() -> None:
    argv = build_argv(spec(), FILES, "tcg", BOOT)
    assert opt(argv, "-machine") == ["pc-q35-7.2"]
    assert not any("pflash" in a or "tpm" in a for a in argv)
    assert "-rtc" not in argv


def test_uefi_flash_as_blockdevs() -> None:
    code = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    argv = build_argv(spec(firmware="uefi", nvram="/d/win1/efivars.fd"), FILES, "tcg", BOOT, firmware_code=code)
    assert opt(argv, "-machine") == ["pc-q35-7.2,pflash0=fwcode,pflash1=efivars"]
    bd = opt(argv, "-blockdev")
    assert bd[:4] == [
        f"driver=file,filename={code},node-name=fwcode-file,read-only=on",
        "driver=raw,file=fwcode-file,node-name=fwcode,read-only=on",
        "driver=file,filename=/d/win1/efivars.fd,node-name=efivars-file,read-only=off",
        "driver=raw,file=efivars-file,node-name=efivars,read-only=off",
    ]
    assert "-global" not in argv  # no Secure Boot: the flash need not be SMM-only
    assert opt(argv, "-kernel") == ["/img/vmlinuz"]  # OVMF boots a kernel given on the command line (fw_cfg)
    with pytest.raises(ValueError, match="give OVMF's code image"):
        build_argv(spec(firmware="uefi", nvram="/d/win1/efivars.fd"), FILES, "tcg", BOOT)


def test_windows_command_line() -> None:
    """--os windows: Secure Boot with SMM-only flash, a TPM on swtpm's socket, Hyper-V, the clock in local time."""
    s = spec(firmware="uefi-secure", nvram="/d/win1/efivars.fd", tpm_state="/d/win1/tpm", os="windows", image=None)
    argv = build_argv(s, FILES, "kvm", None, firmware_code=CODE)
    assert opt(argv, "-machine") == ["pc-q35-7.2,pflash0=fwcode,pflash1=efivars,smm=on"]
    assert opt(argv, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    assert opt(argv, "-chardev")[-1] == "socket,id=chrtpm,path=/run/k/win1/swtpm.sock"
    assert opt(argv, "-tpmdev") == ["emulator,id=tpm0,chardev=chrtpm"]
    assert "tpm-crb,tpmdev=tpm0" in opt(argv, "-device")
    (cpu,) = opt(argv, "-cpu")
    assert cpu.startswith("qemu64,+cx16,") and cpu.endswith(
        ",hv_relaxed,hv_vapic,hv_spinlocks=0x1fff,hv_time,hv_vpindex,hv_synic,hv_stimer,hv_reset,hv_frequencies"
    )
    assert opt(argv, "-rtc") == ["base=localtime"]
    assert "-kernel" not in argv
    # Without KVM QEMU refuses hv_vpindex (and so synic and stimer): a TCG host leaves those three out.
    (tcg_cpu,) = opt(build_argv(s, FILES, "tcg", None, firmware_code=CODE), "-cpu")
    assert tcg_cpu.endswith(",hv_relaxed,hv_vapic,hv_spinlocks=0x1fff,hv_time,hv_reset,hv_frequencies")
    # A Windows VM made before kasou named CPU models still gets the enlightenments, on the default model.
    assert opt(build_argv(s.model_copy(update={"cpu": None}), FILES, "kvm", None, firmware_code=CODE), "-cpu")[
        0
    ].endswith(",".join(HYPERV_FLAGS))


def test_launch_spec_needs_vars_exactly_for_uefi() -> None:
    with pytest.raises(ValueError, match="variable store"):
        spec(firmware="uefi")
    with pytest.raises(ValueError, match="variable store"):
        spec(nvram="/d/win1/efivars.fd")


def test_swtpm_command_line() -> None:
    argv = tpm.swtpm_argv(Path("/d/win1/tpm"), Path("/run/k/win1"))
    assert argv == [
        "swtpm", "socket", "--tpm2",
        "--tpmstate", "dir=/d/win1/tpm,mode=0600",
        "--ctrl", "type=unixio,path=/run/k/win1/swtpm.sock,mode=0600",
        "--log", "file=/run/k/win1/swtpm.log,level=1",
        "--terminate",
    ]  # fmt: skip


def test_the_variable_store_is_the_second_flash_chip_in_query_block() -> None:
    blocks = [
        {"device": "", "qdev": "/machine/system.flash0", "inserted": {"node-name": "fwcode"}},
        {"device": "", "qdev": "/machine/system.flash1", "inserted": {"node-name": "efivars"}},
        {"device": "", "qdev": "/machine/peripheral/disk0-dev/virtio-backend", "inserted": {"node-name": "disk0"}},
    ]
    assert top_of(blocks, "efivars")["node-name"] == "efivars"
    assert top_of(blocks, "disk0")["node-name"] == "disk0"


# -- files ----------------------------------------------------------------------------------------


def test_vars_store_is_a_copy_and_nothing_is_left_on_failure(tmp_path: Path) -> None:
    ovmf = tmp_path / "ovmf"
    ovmf.mkdir()
    (ovmf / "OVMF_CODE_4M.fd").write_bytes(b"code")
    (ovmf / "OVMF_VARS_4M.fd").write_bytes(b"vars" * 100)
    dest = tmp_path / "vm" / "efivars.fd"
    fw.make_vars(dest, "uefi", ovmf)
    assert dest.read_bytes() == b"vars" * 100 and (dest.stat().st_mode & 0o777) == 0o600
    with pytest.raises(AlreadyExists):
        fw.make_vars(dest, "uefi", ovmf)
    with pytest.raises(HypervisorError, match=r"OVMF_CODE_4M.secboot.fd is missing \(apt-get install ovmf\)"):
        fw.make_vars(tmp_path / "vm2" / "efivars.fd", "uefi-secure", ovmf)
    assert not (tmp_path / "vm2").exists()


def test_tpm_state_backup_round_trip_and_hostile_archives(tmp_path: Path) -> None:
    state = tmp_path / "tpm"
    state.mkdir()
    (state / "tpm2-00.permall").write_bytes(os.urandom(600))
    (state / ".lock").write_bytes(b"")
    (state / "TMP2-00.permall").write_bytes(b"half-written")
    (state / "link").symlink_to("/etc/passwd")
    made = agent_fw.pack(state, tmp_path / "b" / "g1.tar")
    with tarfile.open(made.path) as tar:
        assert tar.getnames() == ["tpm2-00.permall"]
    data = Path(made.path).read_bytes()
    assert agent_fw.digest(data) == made.digest
    agent_fw.unpack(data, tmp_path / "restored")
    assert (tmp_path / "restored" / "tpm2-00.permall").read_bytes() == (state / "tpm2-00.permall").read_bytes()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(state / "tpm2-00.permall", arcname="../escape")
    with pytest.raises(BackupCorrupt, match=r"unexpected entry '\.\./escape'"):
        agent_fw.unpack(evil.read_bytes(), tmp_path / "r2")
    assert not (tmp_path / "escape").exists()
