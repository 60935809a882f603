"""A VM's firmware, TPM and guest OS type: what it boots with, fixed when it is created.

* ``bios`` (the default): SeaBIOS, no state of its own.
* ``uefi``: OVMF (EDK II) from Debian's ``ovmf`` package, the 4 MiB images. Each VM has its own
  copy of the UEFI variable store (boot entries, settings), a raw file beside its disks.
* ``uefi-secure``: OVMF built with Secure Boot and SMM, its variables with Microsoft's keys enrolled
  (``OVMF_VARS_4M.ms.fd``), so Microsoft-signed boot loaders (Windows, Debian's shim) boot with
  Secure Boot enforcing.

A TPM 2.0 (``tpm``) is an ``swtpm`` process per VM whose state is a directory beside the disks.
``os="windows"`` asks for what Windows 11 and Windows Server 2025 need: ``uefi-secure``, a TPM,
Hyper-V enlightenments and the real-time clock in local time.

Both state files move with the VM (live migration, backups, restores) and go when it is deleted;
see ``docs/firmware.md``. Pure names and rules here; the files are made by the agent
(:mod:`kasou.agent.firmware`) and used by the driver (:mod:`kasou.hypervisor.qemu.firmware`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from kasou.errors import InvalidSpec

Firmware = Literal["bios", "uefi", "uefi-secure"]
GuestOs = Literal["linux", "windows", "other"]
FIRMWARES: tuple[str, ...] = get_args(Firmware)
GUEST_OSES: tuple[str, ...] = get_args(GuestOs)
DEFAULT_FIRMWARE: Firmware = "bios"

#: The UEFI variable store among a VM's block nodes (backups, migration mirrors): never a disk id.
VARS_ID = "efivars"
VARS_FILE = "efivars.fd"  # in the VM's directory (the directory of its first disk)
TPM_DIR = "tpm"  # ditto: the TPM's state directory
#: OVMF needs more memory than SeaBIOS: with 128 MiB the tiny guest's kernel dies as OVMF hands over to it.
UEFI_MIN_MEMORY_MIB = 256
#: Hyper-V enlightenments for Windows guests (as Proxmox VE and libvirt give them), on the -cpu value.
HYPERV_FLAGS = (
    "hv_relaxed",
    "hv_vapic",
    "hv_spinlocks=0x1fff",
    "hv_time",
    "hv_vpindex",
    "hv_synic",
    "hv_stimer",
    "hv_reset",
    "hv_frequencies",
)


def is_uefi(firmware: str) -> bool:
    return firmware in ("uefi", "uefi-secure")


def validate_firmware(firmware: str) -> Firmware:
    if firmware not in FIRMWARES:
        raise InvalidSpec(f"firmware must be one of {', '.join(FIRMWARES)}, not {firmware!r}", field="firmware")
    return firmware  # type: ignore[return-value]


def validate_os(os: str) -> GuestOs:
    if os not in GUEST_OSES:
        raise InvalidSpec(f"os must be one of {', '.join(GUEST_OSES)}, not {os!r}", field="os")
    return os  # type: ignore[return-value]


def resolve(firmware: str | None, tpm: bool | None, os: str | None) -> tuple[Firmware, bool, GuestOs | None]:
    """The firmware, TPM and OS type a new VM gets from what was asked (None: not asked), or one line
    saying why the combination cannot work. ``--os windows`` brings ``uefi-secure`` and a TPM."""
    fw = validate_firmware(firmware) if firmware is not None else None
    guest = validate_os(os) if os is not None else None
    if guest == "windows":
        if fw is not None and fw != "uefi-secure":
            raise InvalidSpec(
                f"--os windows needs --firmware uefi-secure, not {fw} (Windows 11 and Windows Server 2025 "
                "boot only with UEFI Secure Boot and a TPM 2.0)",
                field="firmware",
            )
        if tpm is False:
            raise InvalidSpec(
                "--os windows needs a TPM (Windows 11 and Windows Server 2025 refuse to install without a TPM 2.0)",
                field="tpm",
            )
        return "uefi-secure", True, guest
    return fw or DEFAULT_FIRMWARE, bool(tpm), guest


def check_memory(firmware: str, memory_mib: int) -> None:
    if is_uefi(firmware) and memory_mib < UEFI_MIN_MEMORY_MIB:
        raise InvalidSpec(
            f"UEFI needs at least {UEFI_MIN_MEMORY_MIB} MiB of memory, not {memory_mib} (OVMF takes more than "
            "SeaBIOS); give --memory 256 or more",
            field="memory_mib",
        )


def check_storage(firmware: str, tpm: bool, storage: str, mirrored: bool) -> None:
    """Firmware state lives beside the VM's first disk, in one place: refused where its disks are kept
    twice, since the second place would lack it (HA on the replica's host, the mirror's other pool)."""
    if firmware == DEFAULT_FIRMWARE and not tpm:
        return
    what = " and ".join(w for w, on in (("UEFI variables", is_uefi(firmware)), ("a TPM", tpm)) if on)
    if storage == "replicated":
        raise InvalidSpec(
            f"a replicated VM cannot have {what} yet: only its disks are replicated, so its replica's host "
            "could not start it with them; use --storage shared for HA",
            field="storage",
        )
    if mirrored:
        raise InvalidSpec(
            f"a VM with a mirrored disk cannot have {what} yet: they would be kept in the first pool only",
            field="mirror",
        )


def check_template(
    template: str, have: tuple[str, bool, str | None], asked: tuple[str | None, bool | None, str | None]
) -> None:
    """A linked clone boots its template's disk: it has the template's firmware, TPM and OS type."""
    for what, t, a in zip(("firmware", "tpm", "os"), have, asked, strict=True):
        if a is not None and a != t:
            shown = ("on" if t else "off") if isinstance(t, bool) else (t or "not set")
            raise InvalidSpec(
                f"a linked clone has its template's {what} ({template}: {shown}); leave --{what} out",
                field=what,
            )


def alternate(path: str | Path) -> str:
    """The other name for a VM's firmware state file or directory on the destination of a migration
    (``efivars.fd`` <-> ``efivars-2.fd``, ``tpm`` <-> ``tpm-2``): where both hosts see one directory
    (shared storage, a lab on one machine) the two never collide."""
    p = Path(path)
    stem, suffix = p.stem, p.suffix
    stem = stem.removesuffix("-2") if stem.endswith("-2") else f"{stem}-2"
    return str(p.with_name(stem + suffix))


#: QEMU 7.2 refuses these without KVM ("kernel doesn't allow setting HyperV VP_INDEX"); stimer needs synic.
HYPERV_KVM_ONLY = ("hv_vpindex", "hv_synic", "hv_stimer")


def hyperv_cpu(cpu: str, kvm: bool = True) -> str:
    """The ``-cpu`` value of a Windows guest: the model with the Hyper-V enlightenments (under TCG without
    those QEMU takes from KVM only)."""
    return ",".join([cpu, *(f for f in HYPERV_FLAGS if kvm or f not in HYPERV_KVM_ONLY)])


def moved(nvram: str | None, tpm_state: str | None, home: str | None) -> tuple[str | None, str | None]:
    """Where a live migration puts a VM's firmware state. With local disks (``home``: the VM's directory on
    the destination) both go there under their other names; on shared storage (``home`` None) the variable
    store stays where it is and the TPM's state goes to a new directory beside the old one (see
    :mod:`kasou.hypervisor.qemu.tpm`: swtpm locks the directory it runs on)."""
    new_nvram = nvram
    if nvram is not None and home is not None:
        new_nvram = str(Path(home) / Path(alternate(nvram)).name)
    new_tpm = None
    if tpm_state is not None:
        new_tpm = str(Path(home or Path(tpm_state).parent) / Path(alternate(tpm_state)).name)
    return new_nvram, new_tpm
