"""The replicas this host keeps of other hosts' VM disks (the replica side of disk replication).

A replica is a qcow2 file ``<disks>/<vm>/<disk_id>.replica.qcow2`` with a record
beside it (``.replica.json``), served over NBD by a daemon (the driver's
:class:`~kasou.hypervisor.base.ReplicaExports`: ``qemu-storage-daemon`` with
QEMU) for the VM's host to mirror into. Files and records live on the disk
directory, so they outlive the agent and a reboot of the host: after a reboot
the daemon is gone but the file (perhaps the only copy left of the VM) is
still listed, promotable, and served again by a new ``create`` of the same disk.

Every operation is idempotent and bounded, and leaves nothing behind on failure:

* ``create`` makes the file and starts its daemon; the same request again returns
  the same target while the daemon runs, or serves the file again if its daemon
  is gone; a replica of another size, or one promoted, is refused;
* ``delete`` stops the daemons of one VM and removes (or keeps) the files;
* ``promote`` stops the daemons and hands over the files: the VM can be started
  here from them (they are its disks from then on, never deleted by ``delete``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import Conflict, HypervisorError, InvalidSpec, NotFound
from kasou.hypervisor.base import ReplicaExports, ReplicaTarget, validate_disk_id
from kasou.model.names import validate_name

SUFFIX = ".replica.qcow2"
RECORD_SUFFIX = ".replica.json"


class ReplicaCreate(BaseModel):
    """Body of the agent's ``POST /replicas``."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    disk_id: str
    size_bytes: int = Field(gt=0)  # the virtual size of the VM's disk (they must be equal)
    listen_host: str | None = None  # None: the agent's migration address
    writethrough: bool = False  # flush every write to the replica's disk before it is acknowledged (slower)


class ReplicaInfo(BaseModel):
    """One replica on this host, as ``GET /replicas`` lists it."""

    vm: str
    disk_id: str
    path: str
    size_bytes: int
    nbd_host: str
    nbd_port: int
    export: str
    writethrough: bool = False
    created: float  # epoch seconds
    daemon_alive: bool
    file_exists: bool
    promoted: bool = False


class ReplicaRemoval(BaseModel):
    vm: str
    removed: list[str] = []  # files deleted
    kept: list[str] = []  # files left in place (keep_file)


class ReplicaPromotion(BaseModel):
    """The files a VM can be started from on this host, by disk id."""

    vm: str
    disks: dict[str, str]


class Replicas:
    """The replicas under one host's disk directory."""

    def __init__(self, disks_dir: Path, exports: ReplicaExports | None, listen_host: str) -> None:
        self.disks_dir = disks_dir
        self.exports = exports
        self.listen_host = listen_host
        self._locks: dict[str, asyncio.Lock] = {}

    def _exports(self) -> ReplicaExports:
        if self.exports is None:
            raise HypervisorError("this host cannot serve disk replicas")
        return self.exports

    @contextlib.asynccontextmanager
    async def _lock(self, vm: str) -> AsyncIterator[None]:
        async with self._locks.setdefault(vm, asyncio.Lock()):
            yield

    def path(self, vm: str, disk_id: str) -> Path:
        validate_name(vm, "vm")
        validate_disk_id(disk_id)
        return self.disks_dir.absolute() / vm / f"{disk_id}{SUFFIX}"

    @staticmethod
    def _record_path(path: Path) -> Path:
        return path.with_name(path.name.removesuffix(SUFFIX) + RECORD_SUFFIX)

    def _read(self, path: Path) -> ReplicaInfo | None:
        try:
            data = json.loads(self._record_path(path).read_text())
        except (OSError, ValueError):
            return None
        alive = self.exports is not None and self.exports.alive(path)
        try:
            return ReplicaInfo(**data, path=str(path), daemon_alive=alive, file_exists=path.exists())
        except ValueError:
            return None

    def _write(self, path: Path, info: ReplicaInfo) -> None:
        data = info.model_dump(exclude={"path", "daemon_alive", "file_exists"})
        rec = self._record_path(path)
        tmp = rec.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(rec)

    def _disks_of(self, vm: str) -> list[str]:
        """Disk ids with any replica file, record or daemon pid file of ``vm`` here."""
        validate_name(vm, "vm")
        d = self.disks_dir / vm
        ids = set()
        for f in d.glob("*.replica.*") if d.is_dir() else []:
            with contextlib.suppress(InvalidSpec):
                ids.add(validate_disk_id(f.name.split(".replica.", 1)[0]))
        return sorted(ids)

    @staticmethod
    def target(info: ReplicaInfo) -> ReplicaTarget:
        return ReplicaTarget(
            vm=info.vm,
            disk_id=info.disk_id,
            nbd_host=info.nbd_host,
            nbd_port=info.nbd_port,
            export=info.export,
            path=info.path,
        )

    async def create(self, req: ReplicaCreate) -> ReplicaTarget:
        path = self.path(req.vm, req.disk_id)
        host = req.listen_host or self.listen_host
        exports = self._exports()
        async with self._lock(req.vm):
            current = self._read(path)
            if current is not None:
                if current.promoted:
                    raise Conflict(f"the replica {path} was promoted: it is a disk of VM {req.vm!r} now")
                if current.size_bytes != req.size_bytes:
                    raise Conflict(
                        f"a replica of disk {req.disk_id} of VM {req.vm!r} exists here with "
                        f"{current.size_bytes} bytes, not {req.size_bytes}; delete it first"
                    )
                if current.daemon_alive and (req.listen_host is None or req.listen_host == current.nbd_host):
                    return self.target(current)  # the same request again
                if current.daemon_alive:
                    raise Conflict(f"the replica {path} is served on {current.nbd_host}, not {host}; delete it first")
                if current.file_exists:  # its daemon is gone (a reboot): serve the same file again
                    return await self._serve(path, current.model_copy(update={"nbd_host": host}), fresh=False)
            await exports.stop(path)  # a daemon of a create that died half-way (no record yet)
            path.unlink(missing_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            info = ReplicaInfo(
                vm=req.vm,
                disk_id=req.disk_id,
                path=str(path),
                size_bytes=req.size_bytes,
                nbd_host=host,
                nbd_port=1,
                export="",
                writethrough=req.writethrough,
                created=time.time(),
                daemon_alive=False,
                file_exists=True,
            )
            return await self._serve(path, info, fresh=True)

    async def _serve(self, path: Path, info: ReplicaInfo, fresh: bool) -> ReplicaTarget:
        """(Make the file and) start its daemon under a new export name, then record it; undone on failure."""
        exports = self._exports()
        export = f"kasou-{info.vm}-{info.disk_id}-{secrets.token_hex(4)}"  # a stale client never finds it
        try:
            if fresh:
                await exports.create(path, info.size_bytes)
            port = await exports.start(path, export, info.nbd_host, info.writethrough)
            info = info.model_copy(update={"nbd_port": port, "export": export, "daemon_alive": True})
            try:
                self._write(path, info)
            except BaseException:
                await exports.stop(path)
                raise
        except BaseException:
            if fresh:
                path.unlink(missing_ok=True)
                self._record_path(path).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()
            raise
        return self.target(info)

    async def list(self) -> list[ReplicaInfo]:
        out = []
        for rec in sorted(self.disks_dir.glob(f"*/*{RECORD_SUFFIX}")) if self.disks_dir.is_dir() else []:
            info = self._read(rec.with_name(rec.name.removesuffix(RECORD_SUFFIX) + SUFFIX))
            if info is not None:
                out.append(info)
        return out

    async def delete(self, vm: str, keep_file: bool = False) -> ReplicaRemoval:
        """Stop the daemons of ``vm``'s replicas and remove their files (or keep them); unknown: nothing."""
        out = ReplicaRemoval(vm=vm)
        async with self._lock(vm):
            disks = self._disks_of(vm)
            for disk_id in disks:
                path = self.path(vm, disk_id)
                info = self._read(path)
                if info is not None and info.promoted and not keep_file:
                    raise Conflict(
                        f"the replica {path} was promoted and is a disk of VM {vm!r}; "
                        "delete it as a disk, or forget the replica with keep_file"
                    )
            for disk_id in disks:
                path = self.path(vm, disk_id)
                if self.exports is not None:
                    await self.exports.stop(path)
                if path.exists():
                    if keep_file:
                        out.kept.append(str(path))
                    else:
                        path.unlink()
                        out.removed.append(str(path))
                self._record_path(path).unlink(missing_ok=True)
                path.with_suffix(".pid").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (self.disks_dir / vm).rmdir()
        return out

    async def promote(self, vm: str) -> ReplicaPromotion:
        """Stop serving ``vm``'s replicas and hand their files over to start the VM here from them."""
        async with self._lock(vm):
            infos = [i for d in self._disks_of(vm) if (i := self._read(self.path(vm, d))) is not None]
            if not infos:
                raise NotFound(f"this host keeps no replica of VM {vm!r}")
            for info in infos:
                if not info.file_exists:
                    raise NotFound(f"the replica file {info.path} of VM {vm!r} is missing")
            for info in infos:
                path = Path(info.path)
                if self.exports is not None:
                    await self.exports.stop(path)  # the VM's old host can write to it no more
                if not info.promoted:
                    self._write(path, info.model_copy(update={"promoted": True}))
            return ReplicaPromotion(vm=vm, disks={i.disk_id: i.path for i in infos})
