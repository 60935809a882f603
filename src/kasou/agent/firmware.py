"""A VM's firmware state on its host: the UEFI variable store and the TPM's state directory, beside its disks.

Both live in the VM's directory (the one of its first disk: ``<pool>/<vm>/efivars.fd`` and
``<pool>/<vm>/tpm/``), so shared storage shares them, and they are deleted with the disks (the disk
API's delete takes a TPM state directory too). The agent makes them when the VM is created
(:meth:`FirmwareState.create`), and packs and restores the TPM's state for backups: a tar file of
its directory, with the SHA-256 of the file as its digest, checked before a restore writes anything.
The variable store is backed up as a disk (``efivars``, raw): see :mod:`kasou.agent.backups`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import shutil
import stat
import tarfile
from pathlib import Path

from fastapi import FastAPI

from kasou.agent.models import FirmwareCreate, FirmwareFiles, TpmBackup, TpmRestore
from kasou.agent.storage import LocalDisks
from kasou.errors import AlreadyExists, BackupCorrupt, InvalidSpec
from kasou.hypervisor.qemu import firmware as fw
from kasou.hypervisor.qemu import tpm
from kasou.model.firmware import TPM_DIR, VARS_FILE, is_uefi
from kasou.model.names import validate_name

SKIPPED = (".lock",)  # swtpm's lock file; its half-written files are named TMP*


class FirmwareState:
    def __init__(self, disks: LocalDisks, ovmf_dir: Path) -> None:
        self.disks = disks
        self.ovmf_dir = ovmf_dir

    async def create(self, req: FirmwareCreate) -> FirmwareFiles:
        """The new VM's variable store (a copy of OVMF's template or of ``vars_of``) and TPM; all or nothing."""
        validate_name(req.vm)
        home = self.disks.check_disk_path(req.beside).parent
        if home.name != req.vm:
            raise InvalidSpec(f"{req.beside} is not in a directory of VM {req.vm!r}", field="beside")
        made: list[Path] = []
        out = FirmwareFiles()
        try:
            if is_uefi(req.firmware):
                copy_of = self.disks.check_disk_path(req.vars_of) if req.vars_of is not None else None
                nvram = home / VARS_FILE
                await asyncio.to_thread(fw.make_vars, nvram, req.firmware, self.ovmf_dir, copy_of)
                made.append(nvram)
                out.nvram = str(nvram)
            if req.tpm:
                state = home / TPM_DIR
                await tpm.manufacture(state)
                made.append(state)
                out.tpm_state = str(state)
        except BaseException:
            for p in made:
                with contextlib.suppress(Exception):
                    await self.disks.delete(p)
            raise
        return out

    async def restore_tpm(self, req: TpmRestore, backups: Path) -> FirmwareFiles:
        """A new VM's TPM state from a generation's tar file, only if its digest is the recorded one."""
        src = Path(req.path).absolute()
        if backups.resolve() not in src.resolve().parents:
            raise InvalidSpec(f"{req.path} is not in the backup directory of this host", field="path")
        dest = self.disks.check_disk_path(req.beside).parent / TPM_DIR
        if dest.exists():
            raise AlreadyExists(f"the TPM state {dest} already exists")
        try:
            data = await asyncio.to_thread(src.read_bytes)
        except OSError as e:
            raise BackupCorrupt(f"the TPM state's backup {src} cannot be read: {e.strerror}") from None
        if digest(data) != req.digest:
            raise BackupCorrupt(f"the TPM state's backup {src} does not hold what was backed up (digest differs)")
        try:
            await asyncio.to_thread(unpack, data, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return FirmwareFiles(tpm_state=str(dest))


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pack(state_dir: Path, dest: Path) -> TpmBackup:
    """A tar file of the TPM's state files at ``dest`` (which must not exist). swtpm replaces a state file by
    renaming a complete new one over it, so each file read is whole, also while the VM runs."""
    if dest.exists():
        raise AlreadyExists(f"{dest} already exists")
    if not state_dir.is_dir():
        raise InvalidSpec(f"the TPM state {state_dir} is missing", field="tpm_state")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(state_dir.iterdir()):
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode) or entry.name in SKIPPED or entry.name.startswith("TMP"):
                continue
            content = entry.read_bytes()
            info = tarfile.TarInfo(entry.name)
            info.size, info.mode, info.mtime = len(content), 0o600, int(st.st_mtime)
            tar.addfile(info, io.BytesIO(content))
    data = buf.getvalue()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.rename(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return TpmBackup(path=str(dest), digest=digest(data), file_bytes=len(data))


def unpack(data: bytes, dest: Path) -> None:
    """The files of a TPM state tar into a new directory ``dest``: plain files with plain names only."""
    dest.mkdir(mode=0o700)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            name = member.name
            if not member.isfile() or "/" in name or name in ("", ".", "..") or name.startswith("."):
                raise BackupCorrupt(f"the TPM state's backup holds an unexpected entry {name!r}")
            f = tar.extractfile(member)
            assert f is not None
            target = dest / name
            target.write_bytes(f.read())
            target.chmod(0o600)


def add_firmware_routes(app: FastAPI, state: FirmwareState, backups: Path) -> None:
    """``POST /agent/v1/firmware`` (a new VM's state) and ``POST /agent/v1/backups/restore-tpm``."""

    @app.post("/agent/v1/firmware")
    async def create_firmware(req: FirmwareCreate) -> FirmwareFiles:
        return await state.create(req)

    @app.post("/agent/v1/backups/restore-tpm")
    async def restore_tpm(req: TpmRestore) -> FirmwareFiles:
        return await state.restore_tpm(req, backups)
