"""UEFI for QEMU: OVMF's images (Debian's ``ovmf``, the 4 MiB build), each VM's variable store, and the
options that give a q35 machine its two flash chips.

``pflash0`` is OVMF's code, read-only and shared by every VM; ``pflash1`` is the VM's own variable
store, a raw file beside its disks, opened as block nodes ``efivars-file`` and ``efivars``
(:data:`kasou.model.firmware.VARS_ID`), the way libvirt names them with ``-blockdev``. Secure Boot
takes OVMF's Secure Boot build, SMM (``smm=on``) and flash that only SMM code may write
(``cfi.pflash01``'s ``secure`` property), as libvirt sets them, so a guest cannot rewrite its own
Secure Boot keys.

The variable store is a block node like a disk's: a live migration with local disks mirrors it to
the destination with the disks, a backup of a running VM copies it in the same transaction as the
disks, and QEMU itself carries the flash contents in the migration stream and writes them into the
destination's file when the VM resumes there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kasou.errors import AlreadyExists, HypervisorError
from kasou.model.firmware import VARS_ID, is_uefi

CODE = {"uefi": "OVMF_CODE_4M.fd", "uefi-secure": "OVMF_CODE_4M.secboot.fd"}
#: uefi-secure: Microsoft's KEK and db enrolled (Windows, and Debian's shim, which Microsoft signed).
VARS = {"uefi": "OVMF_VARS_4M.fd", "uefi-secure": "OVMF_VARS_4M.ms.fd"}
CODE_NODE = "fwcode"


@dataclass(frozen=True)
class Ovmf:
    code: Path
    vars_template: Path


def ovmf(firmware: str, ovmf_dir: Path) -> Ovmf:
    """The host's OVMF images for ``firmware`` (uefi or uefi-secure); HypervisorError if they are missing."""
    if not is_uefi(firmware):
        raise HypervisorError(f"firmware {firmware!r} uses no OVMF image")
    files = Ovmf(ovmf_dir / CODE[firmware], ovmf_dir / VARS[firmware])
    for p in (files.code, files.vars_template):
        if not p.is_file():
            raise HypervisorError(
                f"the UEFI firmware is not installed on this host: {p} is missing (apt-get install ovmf)"
            )
    return files


def make_vars(path: Path, firmware: str, ovmf_dir: Path, copy_of: Path | None = None) -> None:
    """A VM's own variable store at ``path``: a copy of OVMF's template, or of ``copy_of`` (a template VM's,
    so a linked clone keeps its boot entries). Refuses an existing file; leaves nothing on failure."""
    source = copy_of if copy_of is not None else ovmf(firmware, ovmf_dir).vars_template
    if path.exists():
        raise AlreadyExists(f"the UEFI variable store {path} already exists")
    if not source.is_file():
        raise HypervisorError(f"cannot copy the UEFI variables of {source}: the file is missing")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o600)
        tmp.rename(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        raise HypervisorError(f"cannot make the UEFI variable store {path}: {e.strerror}") from None


def machine_value(machine: str, firmware: str) -> str:
    """``-machine``'s value: the machine type, with the flash chips (and SMM for Secure Boot) under UEFI."""
    if not is_uefi(firmware):
        return machine
    value = f"{machine},pflash0={CODE_NODE},pflash1={VARS_ID}"
    return value + ",smm=on" if firmware == "uefi-secure" else value


def qemu_args(firmware: str, code: Path, nvram: str) -> list[str]:
    """The block nodes of the two flash chips (and, for Secure Boot, flash only SMM may write)."""
    if not is_uefi(firmware):
        return []
    args = [
        "-blockdev", f"driver=file,filename={_opt(str(code))},node-name={CODE_NODE}-file,read-only=on",
        "-blockdev", f"driver=raw,file={CODE_NODE}-file,node-name={CODE_NODE},read-only=on",
        "-blockdev", f"driver=file,filename={_opt(nvram)},node-name={VARS_ID}-file,read-only=off",
        "-blockdev", f"driver=raw,file={VARS_ID}-file,node-name={VARS_ID},read-only=off",
    ]  # fmt: skip
    if firmware == "uefi-secure":
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


def _opt(value: str) -> str:
    return value.replace(",", ",,")
