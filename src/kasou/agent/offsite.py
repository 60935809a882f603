"""Copies of this host's backup generations on a backup server, and restores from there (docs/backup-server.md).

Sending: each disk file of a generation is read as the guest saw it (``kasou.hypervisor.rawview``: the qcow2
through its backing chain, over a read-only FUSE view), cut into 4 MiB chunks, and every chunk the server
does not hold is compressed and encrypted to the site's backup **public** key, then uploaded; the generation's
index follows, with the VM's settings and its TPM state sealed as one more chunk. An incremental generation
whose previous one is the server's newest of the VM reads only the chunks its own layer changed. This host
can encrypt but not decrypt: the private key is not here.

Restoring: the operator's private key comes with the request and lives in memory for its length. Each disk is
written as a sparse raw file (every chunk checked against its keyed id), then converted into the new VM's
qcow2; a failure leaves nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response

from kasou.agent import firmware
from kasou.agent.models import (
    BackupSend,
    BackupSent,
    DiskInfo,
    FirmwareFiles,
    OffsiteFile,
    OffsiteRestore,
    VaultTarget,
)
from kasou.agent.storage import LocalDisks
from kasou.errors import AlreadyExists, BackupCorrupt, InvalidSpec, NotFound
from kasou.hypervisor import guestfiles, imagefiles, rawview
from kasou.hypervisor.base import validate_disk_id
from kasou.model.firmware import TPM_DIR, VARS_FILE, VARS_ID
from kasou.model.names import validate_name
from kasou.vault import client as vault
from kasou.vault.crypt import CHUNK_SIZE, BackupKey, PublicBackupKey


def connect(server: VaultTarget) -> vault.VaultClient:
    return vault.VaultClient(server.url, server.token, fingerprint=server.fingerprint)


class Offsite:
    def __init__(self, disks: LocalDisks, backup_dir: Path) -> None:
        self.disks = disks
        self.dir = backup_dir

    @property
    def scratch(self) -> Path:
        return self.dir / ".scratch"

    def _inside(self, path: str) -> Path:
        p = Path(path).absolute()
        if self.dir.resolve() not in p.resolve().parents:
            raise InvalidSpec(f"{path} is not in the backup directory of this host", field="path")
        if not p.is_file():
            raise NotFound(f"backup file {p} is missing")
        return p

    async def send(self, vm: str, req: BackupSend) -> BackupSent:
        validate_name(vm)
        pub = PublicBackupKey.from_json(req.public_key)
        files = [(d, self._inside(d.path)) for d in req.disks]
        for d, _ in files:
            validate_disk_id(d.disk_id)
        tpm = self._inside(req.tpm_path).read_bytes() if req.tpm_path else None
        sizes = [p.stat().st_size if d.format == "raw" else int((await imagefiles.info(p))["virtual-size"])
                 for d, p in files]  # fmt: skip
        self.scratch.mkdir(parents=True, exist_ok=True)
        return await asyncio.to_thread(self._send, vm, req, pub, list(zip(files, sizes, strict=True)), tpm)

    def _send(self, vm: str, req: BackupSend, pub: PublicBackupKey, files: list[Any], tpm: bytes | None) -> BackupSent:
        t0 = time.monotonic()
        with connect(req.server) as c:
            have = sorted(int(g["generation"]) for g in c.list_generations(vm) if g.get("vm_uuid") == req.vm_uuid)
            newest = have[-1] if have else None
            previous = c.get_generation(vm, newest) if newest is not None else None
            if previous is not None and previous.get("key_fingerprint") != pub.fingerprint:
                previous = None  # encrypted to another key: nothing to reuse
            entries, notes, incremental = [], [], bool(files)
            for (d, path), size in files:
                changed = None
                if d.incremental_of is not None and d.incremental_of == newest:
                    changed = rawview.changed_chunks(path, CHUNK_SIZE)
                else:
                    incremental = False
                    if d.incremental_of is not None:
                        notes.append(f"{d.disk_id}: read whole (the server's newest generation is {newest}, "
                                     f"not {d.incremental_of})")  # fmt: skip
                with rawview.raw_view(path, d.format, self.scratch) as view:
                    entries.append(vault.backup_disk(c, pub, vm, d.disk_id, view, size, previous=previous,
                                                     changed=changed))  # fmt: skip
            config = dict(req.config)
            if tpm is not None:
                config["tpm_tar"] = base64.b64encode(tpm).decode()
                config["tpm_digest"] = firmware.digest(tpm)
            made = vault.make_generation(c, pub, vm, req.vm_uuid, entries, config, generation=req.generation,
                                         created=req.created)  # fmt: skip
        return BackupSent(
            generation=req.generation, key_fingerprint=pub.fingerprint,
            bytes_logical=sum(int(e["size"]) for e in entries), bytes_read=sum(int(e["bytes_read"]) for e in entries),
            bytes_sent=int(made.get("bytes_sent", 0)), incremental=incremental,
            locked_until=made.get("locked_until"), seconds=round(time.monotonic() - t0, 3), note="; ".join(notes),
        )  # fmt: skip

    async def restore(self, req: OffsiteRestore) -> DiskInfo:
        validate_name(req.vm)
        validate_name(req.source_vm)
        validate_disk_id(req.disk_id)
        key = BackupKey.from_json(req.key)
        name = VARS_FILE if req.disk_id == VARS_ID else f"{req.disk_id}.{req.format}"
        dest = self.disks.disks_dir / req.vm / name
        if dest.exists():
            raise AlreadyExists(f"disk {dest} already exists")
        self.scratch.mkdir(parents=True, exist_ok=True)
        raw = self.scratch / f"{req.vm}-{req.disk_id}.raw"
        raw.unlink(missing_ok=True)
        try:
            with connect(req.server) as c:
                index = await asyncio.to_thread(c.get_generation, req.source_vm, req.generation)
                written = await asyncio.to_thread(vault.restore_disk, c, key, index, req.disk_id, raw)
                config = await asyncio.to_thread(vault.restore_config, c, key, index)
            expect = dict(config.get("digests") or {}).get(req.disk_id)
            if expect:  # the source's content at the point in time, recorded when the generation was made
                got = await asyncio.to_thread(imagefiles.digest_raw, raw, int(written["size"]))
                if got != expect:
                    raise BackupCorrupt(f"the restored disk {req.disk_id} does not hold what was backed up "
                                        "(its content digest differs from the source's)")  # fmt: skip
            dest.parent.mkdir(parents=True, exist_ok=True)
            if req.format == "raw":
                await asyncio.to_thread(shutil.copyfile, raw, dest)
            else:
                await imagefiles.convert(raw, dest, "raw")
        except BaseException:
            dest.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                dest.parent.rmdir()
            raise
        finally:
            raw.unlink(missing_ok=True)
        return await self.disks.info(dest)

    async def read_file(self, req: OffsiteFile) -> bytes:
        """One file of a generation's disk: the disk restored to a scratch raw file, its file systems mounted
        read-only one after the other until one holds the path (kasou.hypervisor.guestfiles); the scratch is
        removed however it ends."""
        validate_name(req.source_vm)
        guestfiles.guest_path(req.path)
        key = BackupKey.from_json(req.key)
        self.scratch.mkdir(parents=True, exist_ok=True)
        raw = self.scratch / f"file-{uuid.uuid4().hex[:12]}.raw"
        try:
            with connect(req.server) as c:
                index = await asyncio.to_thread(c.get_generation, req.source_vm, req.generation)
                disks = [str(d["disk_id"]) for d in index.get("disks", []) if d.get("disk_id") != VARS_ID]
                disk = req.disk_id or (disks[0] if disks else "")
                validate_disk_id(disk)
                await asyncio.to_thread(vault.restore_disk, c, key, index, disk, raw)
            return await asyncio.to_thread(guestfiles.read_file, raw, req.path)
        finally:
            raw.unlink(missing_ok=True)

    async def restore_tpm(self, req: OffsiteRestore) -> FirmwareFiles:
        """The new VM's TPM state (``beside`` its first disk) from the generation's sealed settings."""
        validate_name(req.source_vm)
        key = BackupKey.from_json(req.key)
        if req.beside is None:
            raise InvalidSpec("restoring a TPM state needs the new VM's first disk (beside)", field="beside")
        dest = self.disks.check_disk_path(req.beside).parent / TPM_DIR
        if dest.exists():
            raise AlreadyExists(f"the TPM state {dest} already exists")
        with connect(req.server) as c:
            index = await asyncio.to_thread(c.get_generation, req.source_vm, req.generation)
            config = await asyncio.to_thread(vault.restore_config, c, key, index)
        if "tpm_tar" not in config:
            raise NotFound(f"generation {req.generation} of {req.source_vm} holds no TPM state")
        data = base64.b64decode(str(config["tpm_tar"]))
        if firmware.digest(data) != config.get("tpm_digest"):
            raise BackupCorrupt(f"the TPM state of generation {req.generation} does not match its digest")
        try:
            await asyncio.to_thread(firmware.unpack, data, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return FirmwareFiles(tpm_state=str(dest))


def add_offsite_routes(app: FastAPI, offsite: Offsite) -> None:
    """``POST /agent/v1/vms/{name}/backups/send``, ``POST /agent/v1/backups/offsite/restore`` (a disk) and
    ``.../restore-tpm``."""

    @app.post("/agent/v1/vms/{name}/backups/send")
    async def send_backup(name: str, req: BackupSend) -> BackupSent:
        return await offsite.send(name, req)

    @app.post("/agent/v1/backups/offsite/restore")
    async def restore_offsite(req: OffsiteRestore) -> DiskInfo:
        return await offsite.restore(req)

    @app.post("/agent/v1/backups/offsite/file", response_class=Response)
    async def offsite_file(req: OffsiteFile) -> Response:
        return Response(content=await offsite.read_file(req), media_type="application/octet-stream")

    @app.post("/agent/v1/backups/offsite/restore-tpm")
    async def restore_offsite_tpm(req: OffsiteRestore) -> FirmwareFiles:
        return await offsite.restore_tpm(req)
