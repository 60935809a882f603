"""Local disk images of one host, made and removed with ``qemu-img``.

Disks are thin qcow2 files under the host's disk directory: a full (thin) copy
of an image, an overlay on a template's disk (a linked clone) or a blank disk.
A failed creation leaves no file behind. Paths outside the disk directory are
never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from kasou.agent.models import DiskCreate, DiskInfo
from kasou.agent.pools import PoolRef, PoolRegistry
from kasou.errors import AlreadyExists, ImageError, InvalidSpec, KasouError, NotFound, OperationTimeout
from kasou.hypervisor.base import validate_disk_id
from kasou.model.firmware import TPM_DIR, alternate
from kasou.model.names import validate_name
from kasou.model.units import format_size

QEMU_IMG_TIMEOUT = 600.0  # a full copy of a large image can take minutes


async def _run(*argv: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationTimeout(f"{argv[0]} {argv[1]} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {proc.returncode}"
        raise KasouError(msg.removeprefix("qemu-img: "))
    return out.decode()


class LocalDisks:
    def __init__(
        self, disks_dir: Path, images_dir: Path, shared_dir: Path | None = None, pools: PoolRegistry | None = None
    ) -> None:
        self.disks_dir = disks_dir
        self.images_dir = images_dir
        self.shared_dir = shared_dir
        self.pools = pools or PoolRegistry(disks_dir.parent / "pools.json", disks_dir)

    def _roots(self) -> list[Path]:
        dirs = [self.disks_dir, self.shared_dir, *self.pools.roots()]
        return [d.resolve() for d in dirs if d is not None]

    def is_disk_path(self, path: str | Path) -> bool:
        """Is ``path`` in this host's disk directory, its shared storage or a pool it knows of?"""
        p = Path(path).resolve()
        return any(root in p.parents for root in self._roots())

    def _inside(self, path: str | Path) -> Path:
        if not self.is_disk_path(path):
            raise InvalidSpec(f"{path} is not a disk of this host")
        return Path(path).resolve()

    def new_disk_path(
        self, vm: str, disk_id: str, shared: bool = False, pool: str | None = None, pool_path: str | None = None
    ) -> Path:
        """Where a new disk of VM ``vm`` goes (its directory made); AlreadyExists if a file is there."""
        validate_name(vm)
        validate_disk_id(disk_id)
        if shared and self.shared_dir is None:
            raise InvalidSpec("this host has no shared storage (KASOU_SHARED_DIR)", field="storage")
        base = self.shared_dir if shared and self.shared_dir is not None else self.disks_dir
        if pool is not None:
            ref = PoolRef(name=pool, path=pool_path)
            self.pools.register([ref])
            base = self.pools.path_of(ref)
        path = base / vm / f"{disk_id}.qcow2"
        if path.exists():
            raise AlreadyExists(f"disk {path} already exists")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def remove_new_disk(self, path: Path) -> None:
        """Remove a disk being made that failed (and its VM's directory if that is empty now)."""
        path.unlink(missing_ok=True)
        _rmdir_if_empty(path.parent)

    async def create(self, req: DiskCreate) -> DiskInfo:
        path = self.new_disk_path(req.vm, req.disk_id, req.shared, req.pool, req.pool_path)
        vm_dir = path.parent
        try:
            if req.source == "image":
                await self._from_image(req, path)
            elif req.source == "overlay":
                if req.backing is None:
                    raise InvalidSpec("an overlay disk needs a backing disk")
                backing = self._inside(req.backing)
                if not backing.exists():
                    raise NotFound(f"the template disk {backing} is missing on this host")
                size = [] if req.size_bytes is None else [str(req.size_bytes)]
                await _run(
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    str(backing),
                    str(path),
                    *size,
                )
            elif req.source == "copy":
                if req.copy_of is None:
                    raise InvalidSpec("a copy needs the disk to copy")
                src = self._inside(req.copy_of)
                if not src.exists():
                    raise NotFound(f"the disk to copy, {src}, is missing on this host")
                await _run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(src), str(path))
            else:
                if req.size_bytes is None:
                    raise InvalidSpec("a blank disk needs a size")
                await _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(req.size_bytes))
            return await self.info(path)
        except BaseException as e:
            path.unlink(missing_ok=True)
            _rmdir_if_empty(vm_dir)
            if isinstance(e, KasouError) and type(e) is KasouError:
                raise ImageError(f"cannot create disk {req.disk_id} of VM {req.vm!r}: {e.message}") from None
            raise

    async def _from_image(self, req: DiskCreate, path: Path) -> None:
        from kasou.image import load_image

        if req.image is None:
            raise InvalidSpec("an image disk needs an image name")
        art = load_image(self.images_dir, req.image)
        if req.size_bytes is not None and req.size_bytes < art.disk_size_bytes:
            raise InvalidSpec(
                f"disk size {format_size(req.size_bytes)} is smaller than image {req.image!r} "
                f"({format_size(art.disk_size_bytes)})",
                field="disk",
            )
        # A thin copy: convert skips zero clusters, so a 64 MiB image costs what it holds.
        await _run("qemu-img", "convert", "-q", "-f", art.disk_format, "-O", "qcow2", str(art.disk), str(path))
        if req.size_bytes is not None and req.size_bytes > art.disk_size_bytes:
            await _run("qemu-img", "resize", "-q", "-f", "qcow2", str(path), str(req.size_bytes))

    async def grow(self, path: str | Path, size_bytes: int) -> DiskInfo:
        """Grow a disk file of a stopped VM to ``size_bytes`` (``qemu-img resize``, which QEMU's lock refuses
        while a process has it open); a smaller size is refused: shrinking loses data."""
        have = await self.info(path)
        if size_bytes < have.size_bytes:
            raise InvalidSpec(
                f"{format_size(size_bytes)} is smaller than the disk ({format_size(have.size_bytes)}): a disk only "
                "grows (shrinking it would cut off data)",
                field="size",
            )
        if size_bytes > have.size_bytes:
            try:
                await _run("qemu-img", "resize", "-q", "-f", have.format, have.path, str(size_bytes), timeout=60)
            except KasouError as e:
                if type(e) is not KasouError:
                    raise
                raise ImageError(f"cannot grow {have.path}: {e.message}") from None
        return await self.info(path)

    def check_disk_path(self, path: str | Path) -> Path:
        """``path`` if it is inside a disk directory or pool of this host, else InvalidSpec."""
        return self._inside(path)

    async def info(self, path: str | Path) -> DiskInfo:
        p = self._inside(path)
        if not p.exists():
            raise NotFound(f"disk {p} does not exist")
        data: dict[str, Any] = json.loads(await _run("qemu-img", "info", "--output=json", "-U", str(p), timeout=30))
        return DiskInfo(
            path=str(p),
            format=str(data.get("format", "qcow2")),
            size_bytes=int(data.get("virtual-size", 0)),
            allocated_bytes=int(data.get("actual-size", 0)),
            backing=data.get("full-backing-filename") or data.get("backing-filename"),
        )

    async def delete(self, path: str | Path) -> bool:
        """Delete a disk file (or a VM's UEFI variable store, or its TPM's state directory, ``tpm``/``tpm-2``),
        and the VM's directory once it is empty."""
        p = self._inside(path)
        existed = p.exists()
        if p.is_dir() and not p.is_symlink():
            if p.name not in (TPM_DIR, alternate(TPM_DIR)):
                raise InvalidSpec(f"{p} is a directory, not a disk")
            await asyncio.to_thread(shutil.rmtree, p)
        else:
            p.unlink(missing_ok=True)
        _rmdir_if_empty(p.parent)
        return existed


def _rmdir_if_empty(d: Path) -> None:
    with contextlib.suppress(OSError):
        d.rmdir()
