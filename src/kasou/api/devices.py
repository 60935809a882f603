"""``/v1/vms/{name}/disks`` and ``/v1/vms/{name}/nics``: disks and NICs added, grown and removed (hot-plug on a
running VM; :mod:`kasou.control.devices`). Each answers 202 with the job that does it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel

from kasou.control.records import JobRecord
from kasou.model.devices import DiskAdd, DiskResize, NicAdd, check_disk_id, check_nic_id

if TYPE_CHECKING:
    from kasou.api.deps import Services


class DeviceJob(BaseModel):
    job: JobRecord


def device_routes(svc: Callable[[], Services]) -> APIRouter:
    r = APIRouter()

    @r.post("/vms/{name}/disks", status_code=202)
    async def add_disk(name: str, body: dict[str, Any] = Body(...)) -> DeviceJob:
        """A new empty disk (``size``; ``pool``: default the boot disk's), plugged in at once if the VM runs."""
        return DeviceJob(job=await svc().vms.devices.add_disk(name, DiskAdd.parse(body)))

    @r.delete("/vms/{name}/disks/{disk_id}", status_code=202)
    async def remove_disk(name: str, disk_id: str) -> DeviceJob:
        """Unplug a disk (the guest must let go of it) and delete its file; never the boot disk."""
        return DeviceJob(job=await svc().vms.devices.remove_disk(name, check_disk_id(disk_id)))

    @r.post("/vms/{name}/disks/{disk_id}/resize", status_code=202)
    async def resize_disk(name: str, disk_id: str, body: dict[str, Any] = Body(...)) -> DeviceJob:
        """Grow a disk to ``size`` (online on a running VM); a smaller size is refused (422)."""
        req = DiskResize.parse(body)
        return DeviceJob(job=await svc().vms.devices.resize(name, check_disk_id(disk_id), req.size_bytes))

    @r.post("/vms/{name}/nics", status_code=202)
    async def add_nic(name: str, body: dict[str, Any] = Body(...)) -> DeviceJob:
        """A new NIC on ``network`` with a MAC of its own, plugged in at once if the VM runs."""
        return DeviceJob(job=await svc().vms.devices.add_nic(name, NicAdd.parse(body)))

    @r.delete("/vms/{name}/nics/{nic_id}", status_code=202)
    async def remove_nic(name: str, nic_id: str) -> DeviceJob:
        return DeviceJob(job=await svc().vms.devices.remove_nic(name, check_nic_id(nic_id)))

    return r
