"""The agent's routes for devices that change: a disk grown (online through the driver, offline with
``qemu-img``), disks and NICs plugged into and out of a running VM (:meth:`kasou.hypervisor.base.Driver.plug_disk`
and the others)."""

from __future__ import annotations

from fastapi import FastAPI, Query

from kasou.agent.models import DiskGrow, DiskInfo
from kasou.agent.storage import LocalDisks
from kasou.errors import InvalidSpec
from kasou.hypervisor.base import Driver, LaunchDisk, validate_disk_id
from kasou.model.spec import NicSpec


def add_device_routes(app: FastAPI, d: Driver, disks: LocalDisks) -> None:
    @app.post("/agent/v1/vms/{name}/disks/{disk_id}/grow")
    async def grow_disk(name: str, disk_id: str, req: DiskGrow) -> dict[str, bool]:
        await d.grow_disk(name, validate_disk_id(disk_id), req.size_bytes)
        return {"ok": True}

    @app.post("/agent/v1/vms/{name}/disks")
    async def plug_disk(name: str, disk: LaunchDisk) -> dict[str, bool]:
        disks.check_disk_path(disk.path)
        await d.plug_disk(name, disk)
        return {"ok": True}

    @app.delete("/agent/v1/vms/{name}/disks/{disk_id}")
    async def unplug_disk(name: str, disk_id: str, timeout_s: float = Query(30.0, gt=0, le=300)) -> dict[str, bool]:
        await d.unplug_disk(name, validate_disk_id(disk_id), timeout_s)
        return {"ok": True}

    @app.post("/agent/v1/vms/{name}/nics")
    async def plug_nic(name: str, nic: NicSpec) -> dict[str, bool]:
        await d.plug_nic(name, nic)
        return {"ok": True}

    @app.delete("/agent/v1/vms/{name}/nics/{nic_id}")
    async def unplug_nic(name: str, nic_id: str, timeout_s: float = Query(30.0, gt=0, le=300)) -> dict[str, bool]:
        await d.unplug_nic(name, validate_disk_id(nic_id), timeout_s)
        return {"ok": True}

    @app.post("/agent/v1/disks/grow")
    async def grow_file(req: DiskGrow) -> DiskInfo:
        if req.path is None:
            raise InvalidSpec("give the path of the disk to grow", field="path")
        return await disks.grow(req.path, req.size_bytes)
