"""Backup generations on one host: made (through the driver for a running VM, with ``qemu-img`` for a
stopped one), verified after writing, merged when pruned, checked again before a restore.

Files live in the host's backup directory (``KASOU_BACKUP_DIR``, default
``$KASOU_HOME/backups``; in production a mount of another machine or an
immutable store): ``<dir>/<vm>/<disk>/g<generation>-<id>.qcow2``, each with
``<file>.json`` beside it (its record: kind, backing, content digest), so the
directory describes itself. An incremental names its backing file relatively.
Paths outside the backup directory are refused. A failed backup leaves no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI

from kasou.agent import firmware
from kasou.agent.models import (
    BackupCheck,
    BackupCreate,
    BackupFile,
    BackupMade,
    BackupPath,
    BackupPrune,
    BackupRestore,
    DiskInfo,
)
from kasou.agent.storage import LocalDisks
from kasou.errors import AlreadyExists, BackupCorrupt, ImageError, InvalidSpec, NotFound
from kasou.hypervisor import imagefiles
from kasou.hypervisor.backups import BITMAP_PREFIX, BackupDisk, BackupDiskResult, BackupKind, bitmap_name
from kasou.hypervisor.base import Driver, RuntimeState, validate_disk_id
from kasou.model.firmware import TPM_DIR, VARS_FILE, VARS_ID
from kasou.model.names import validate_name

_LIVE = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN)


class BackupFiles:
    def __init__(self, driver: Driver, disks: LocalDisks, backup_dir: Path) -> None:
        self.driver = driver
        self.disks = disks
        self.dir = backup_dir

    @property
    def scratch(self) -> Path:
        return self.dir / ".scratch"

    def _inside(self, path: str | Path) -> Path:
        p = Path(path).absolute()
        if self.dir.resolve() not in p.resolve().parents:
            raise InvalidSpec(f"{path} is not in the backup directory of this host", field="path")
        return p

    def target(self, vm: str, disk_id: str, generation: int, backup_id: str) -> Path:
        return self.dir / vm / disk_id / f"g{generation:06d}-{backup_id}.qcow2"

    async def create(self, vm: str, req: BackupCreate) -> BackupMade:
        validate_name(vm)
        new_bitmap = bitmap_name(req.backup_id)
        disks = []
        for s in req.disks:
            validate_disk_id(s.disk_id)
            if s.backing is not None and not self._inside(s.backing).exists():
                raise NotFound(f"the previous backup generation {s.backing} is missing on this host")
            target = self.target(vm, s.disk_id, req.generation, req.backup_id)
            speed = req.bandwidth_mib_s << 20 if req.bandwidth_mib_s else None
            disks.append(BackupDisk(disk_id=s.disk_id, target=str(target), backing=s.backing,
                                    base_bitmap=s.base_bitmap, new_bitmap=new_bitmap, speed_bytes_s=speed))  # fmt: skip
        info = await self.driver.info(vm)
        running = info is not None and info.state in _LIVE
        t0 = time.monotonic()
        tpm_file = self.dir / vm / TPM_DIR / f"g{req.generation:06d}-{req.backup_id}.tar"
        tpm = None
        try:
            if running:
                results = await self.driver.backup_disks(vm, req.backup_id, disks, req.timeout_s)
            else:
                results = await self._offline(req, disks, new_bitmap)
            if req.tpm_state is not None:  # its files, right after the disks' point in time
                tpm = await asyncio.to_thread(firmware.pack, self.disks.check_disk_path(req.tpm_state), tpm_file)
            t1 = time.monotonic()
            files = [await self._verify_new(r, req, vm) for r in results]
        except BaseException:
            for d in disks:
                imagefiles.remove(Path(d.target))
            if tpm is not None:
                imagefiles.remove(tpm_file)
            raise
        consistency: Literal["application", "crash"] | None = None
        if running:  # every disk shares one point in time: frozen for all or for none
            consistency = "application" if results and all(r.consistency == "application" for r in results) else "crash"
        return BackupMade(running=running, files=files, copy_s=round(t1 - t0, 3),
                          verify_s=round(time.monotonic() - t1, 3), tpm=tpm, consistency=consistency)  # fmt: skip

    async def _offline(self, req: BackupCreate, disks: list[BackupDisk], new_bitmap: str) -> list[BackupDiskResult]:
        """A VM that does not run: a full copy, or an incremental by content against the previous generation."""
        out = []
        for s, d in zip(req.disks, disks, strict=True):
            target = Path(d.target)
            if d.backing is not None:
                await imagefiles.offline_incremental(s.path, s.format, target, Path(d.backing).name)
            else:
                await imagefiles.convert(s.path, target, s.format)
            bitmap = None
            if s.format == "qcow2":  # so that the next backup of the running VM can be incremental
                await imagefiles.set_bitmaps(s.path, new_bitmap, BITMAP_PREFIX)
                bitmap = new_bitmap
            kind: BackupKind = "incremental" if d.backing is not None else "full"
            note = "the VM is stopped: its disk was compared with the previous generation" if d.backing else ""
            out.append(BackupDiskResult(disk_id=d.disk_id, kind=kind, target=d.target, backing=d.backing,
                                        bitmap=bitmap, bytes_copied=0, note=note))  # fmt: skip
        return out

    async def _verify_new(self, r: BackupDiskResult, req: BackupCreate, vm: str) -> BackupFile:
        path = Path(r.target)
        try:
            await imagefiles.check_chain(path)
            digest = await imagefiles.digest(path, self.scratch)
            data = await imagefiles.info(path)
        except ImageError as e:
            raise ImageError(f"the new backup of disk {r.disk_id} failed its verification: {e.message}") from None
        f = BackupFile(
            disk_id=r.disk_id, kind=r.kind, path=str(path), backing=r.backing, bitmap=r.bitmap,
            size_bytes=int(data.get("virtual-size", 0)), file_bytes=int(data.get("actual-size", 0)),
            bytes_copied=r.bytes_copied or int(data.get("actual-size", 0)), digest=digest, note=r.note,
        )  # fmt: skip
        manifest: dict[str, Any] = {"vm": vm, "generation": req.generation, "id": req.backup_id,
                                    "created_at": time.time(), **f.model_dump()}  # fmt: skip
        imagefiles.write_manifest(path, manifest)
        return f

    async def verify(self, req: BackupCheck) -> None:
        """The generation's files pass ``qemu-img check`` and its content digest is the recorded one."""
        path = self._inside(req.path)
        if not path.exists():
            raise BackupCorrupt(f"backup file {path} is missing")
        try:
            await imagefiles.check_chain(path)
            got = await imagefiles.digest(path, self.scratch)
        except ImageError as e:
            raise BackupCorrupt(f"backup file {path} is damaged: {e.message}") from None
        if got != req.digest:
            raise BackupCorrupt(f"backup file {path} does not hold what was backed up (content digest differs)")

    async def restore(self, req: BackupRestore) -> DiskInfo:
        """A new VM's disk (self-contained qcow2) from a generation; refused, leaving nothing, unless it verifies."""
        validate_name(req.vm)
        validate_disk_id(req.disk_id)
        src = self._inside(req.path)
        if not src.exists():
            raise BackupCorrupt(f"backup file {src} is missing")
        name = VARS_FILE if req.disk_id == VARS_ID else f"{req.disk_id}.{req.format}"
        dest = self.disks.disks_dir / req.vm / name
        if dest.exists():
            raise AlreadyExists(f"disk {dest} already exists")
        try:
            await imagefiles.check_chain(src)
            await imagefiles.restore_verified(src, dest, req.digest, self.scratch, req.format)
        except ImageError as e:
            dest.unlink(missing_ok=True)
            _rmdir(dest.parent)
            raise BackupCorrupt(f"refusing to restore from a damaged backup: {e.message}") from None
        except BaseException:
            dest.unlink(missing_ok=True)
            _rmdir(dest.parent)
            raise
        return await self.disks.info(dest)

    async def prune(self, req: BackupPrune) -> None:
        path = self._inside(req.path)
        if req.child is None:
            imagefiles.remove(path)
            return
        child = self._inside(req.child)
        backing = (await imagefiles.info(child)).get("backing-filename")
        if backing is None or (child.parent / str(backing)).resolve() != path.resolve():
            raise InvalidSpec(f"{child} is not backed by {path}", field="child")
        parent_manifest = Path(f"{path}.json")  # the merged file keeps what the dropped one rested on, if anything
        rests_on = json.loads(parent_manifest.read_text()).get("backing") if parent_manifest.exists() else None
        await imagefiles.merge_into_child(path, child)
        parent_manifest.unlink(missing_ok=True)
        manifest_file = Path(f"{child}.json")
        if manifest_file.exists():
            data = json.loads(manifest_file.read_text())
            data.update({"backing": rests_on, "merged_at": time.time()})
            imagefiles.write_manifest(child, data)
        if req.child_digest is not None:
            await self.verify(BackupCheck(path=str(child), digest=req.child_digest))

    async def delete(self, path: str) -> bool:
        p = self._inside(path)
        existed = p.exists()
        imagefiles.remove(p)
        return existed


def _rmdir(d: Path) -> None:
    with contextlib.suppress(OSError):
        d.rmdir()


def add_backup_routes(app: FastAPI, files: BackupFiles) -> None:
    """The agent's backup routes (``/agent/v1/vms/{name}/backups`` and ``/agent/v1/backups/...``)."""

    @app.post("/agent/v1/vms/{name}/backups")
    async def create_backup(name: str, req: BackupCreate) -> BackupMade:
        return await files.create(name, req)

    @app.post("/agent/v1/backups/verify")
    async def verify_backup(req: BackupCheck) -> dict[str, bool]:
        await files.verify(req)
        return {"ok": True}

    @app.post("/agent/v1/backups/restore")
    async def restore_backup(req: BackupRestore) -> DiskInfo:
        return await files.restore(req)

    @app.post("/agent/v1/backups/prune")
    async def prune_backup(req: BackupPrune) -> dict[str, bool]:
        await files.prune(req)
        return {"ok": True}

    @app.post("/agent/v1/backups/delete")
    async def delete_backup(req: BackupPath) -> dict[str, bool]:
        return {"existed": await files.delete(req.path)}
