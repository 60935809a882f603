"""The CD drive of a VM: ``kasou vm media insert NAME ISO`` and ``kasou vm media eject NAME`` (see kasou.model.media).

An ISO is an image of kind ``iso`` in the image store of the VM's host. The disc in the drive is part of
the VM's record: on a stopped VM an insert or an eject changes only the record (the next start puts the
disc in); on a running or paused one the host's agent changes the disc first (QMP), then the record;
either runs as a short job that holds the VM.
A stopped VM without a drive gets one with its first insert; a running one cannot (q35's AHCI drives are
not hot-pluggable): stop it first. A live migration (and a host's maintenance) needs the same ISO image
on the destination (:func:`check_iso_on`), else it is refused naming the ISO and the ways out. An HA
restart on a host without the ISO starts the VM with its drive empty (a server that runs beats one
that waits for its installer disc) and says so in an operator event.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from kasou.control.base import VMControl
from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, VMRecord
from kasou.errors import AgentUnavailable, InvalidSpec, NotFound, OperationTimeout, WrongState
from kasou.model.media import MediaInsert
from kasou.model.state import Action, VMState

if TYPE_CHECKING:
    from kasou.agent.client import AgentClient
    from kasou.control import scheduler

#: The states a VM's disc may change in: its QEMU runs (or is paused), or it has none.
_LIVE = frozenset({VMState.RUNNING, VMState.PAUSED})
_STILL = frozenset({VMState.STOPPED, VMState.CRASHED})


async def iso_info(agent: AgentClient, host: str | None, iso: str) -> dict[str, Any]:
    """What ``host`` says of its ISO image ``iso``; InvalidSpec (one line) if it has none, or it is a disk image."""
    try:
        info = await agent.image_info(iso)
    except NotFound:
        raise InvalidSpec(
            f"no ISO image {iso!r} on host {host} (import it there: kasou image import {iso} FILE.iso)", field="iso"
        ) from None
    if info.get("kind", "disk") != "iso":
        raise InvalidSpec(f"image {iso!r} is a disk image, not an ISO: a CD drive holds an ISO image", field="iso")
    return info


async def hosts_with_iso(vms: VMControl, loads: list[scheduler.HostLoad], iso: str) -> list[scheduler.HostLoad]:
    """The hosts of ``loads`` whose image store has ``iso``; InvalidSpec if none has (a host that does not
    answer is left out)."""
    found = []
    disk = False
    for load in loads:
        with contextlib.suppress(AgentUnavailable, OperationTimeout, NotFound):
            kind = (await vms.agents.get(load.name).image_info(iso)).get("kind", "disk")
            if kind == "iso":
                found.append(load)
            disk = disk or kind == "disk"
    if not found and disk:
        raise InvalidSpec(f"image {iso!r} is a disk image, not an ISO: a CD drive holds an ISO image", field="cdrom")
    if not found:
        raise InvalidSpec(
            f"no host has an ISO image {iso!r} (import it: kasou image import {iso} FILE.iso)", field="cdrom"
        )
    return found


async def has_iso(vms: VMControl, host: str, iso: str) -> bool:
    """Whether ``host``'s image store holds the ISO image ``iso`` (False also when its agent does not say)."""
    try:
        return (await vms.agents.get(host).image_info(iso)).get("kind") == "iso"
    except (NotFound, AgentUnavailable, OperationTimeout):
        return False


async def disk_image(agent: AgentClient, host: str | None, image: str) -> dict[str, Any]:
    """What the host's agent knows of image ``image`` for a new VM's disk: its details. InvalidSpec if the host
    has no such image, or if it is an ISO (naming the way to install from it)."""
    try:
        info = await agent.image_info(image)
    except NotFound:
        built = ", ".join(await agent.images()) or "none"
        raise InvalidSpec(
            f"unknown image {image!r} (on host {host}: {built}; build one with kasou image build tiny|debian, "
            "or import a disk with kasou image import)",
            field="image",
        ) from None
    if info.get("kind", "disk") == "iso":
        raise InvalidSpec(
            f"image {image!r} is an ISO: install from it with --cdrom {image} and a blank disk (--disk SIZE)",
            field="image",
        )
    return info


async def check_iso_on(vms: VMControl, rec: VMRecord, target: str) -> None:
    """Refuse to move a VM with a disc in its drive to a host that lacks that ISO image (or has another
    file under its name: the sizes differ)."""
    if rec.cdrom is None:
        return
    way_out = f"import it there (kasou image import {rec.cdrom} FILE.iso on {target}) or eject it " \
              f"(kasou vm media eject {rec.name})"  # fmt: skip
    try:
        there = await vms.agents.get(target).image_info(rec.cdrom)
    except NotFound:
        raise WrongState(
            f"VM {rec.name!r} has ISO image {rec.cdrom!r} in its CD drive and host {target} has no such image: "
            + way_out
        ) from None
    here = await vms.agents.get(rec.host).image_info(rec.cdrom)
    if there.get("kind") != "iso" or there.get("disk_size_bytes") != here.get("disk_size_bytes"):
        raise WrongState(
            f"VM {rec.name!r} has ISO image {rec.cdrom!r} in its CD drive and host {target}'s image of that name "
            f"is not the same file: " + way_out
        )


class Media:
    """Insert and eject (part of :class:`kasou.control.vms.VMService`: ``VMService.media``).

    Each is checked first (a refusal is one line and changes nothing), then runs as a job that holds
    the VM (no migration, start or stop meanwhile): the agent changes the disc of a running VM, then
    the record."""

    def __init__(self, vms: VMControl) -> None:
        self.vms = vms

    async def _changeable(self, name: str, what: str) -> VMRecord:
        rec = await self.vms.records.get(name)
        if rec.job is not None:
            raise WrongState(f"VM {name!r} is busy with job {rec.job}; try again when it ends", job=rec.job)
        if rec.state not in _LIVE | _STILL:
            raise WrongState(f"cannot {what} VM {name!r} while it is {rec.state.value}: wait until it runs or stops")
        return rec

    async def insert(self, name: str, req: MediaInsert) -> JobRecord:
        """Put ISO image ``req.iso`` in the VM's drive (replacing the disc it holds)."""
        rec = await self._changeable(name, "change the CD of")
        if not rec.cdrom_drive and rec.state in _LIVE:
            raise WrongState(_NO_HOTPLUG.format(name=name))
        await iso_info(self.vms.agents.get(rec.host), rec.host, req.iso)
        return await self._submit(name, req.iso)

    async def eject(self, name: str) -> JobRecord:
        """Empty the VM's drive."""
        rec = await self._changeable(name, "eject the CD of")
        if not rec.cdrom_drive:
            raise WrongState(f"VM {name!r} has no CD drive: there is nothing to eject")
        if rec.cdrom is None:
            raise WrongState(f"the CD drive of VM {name!r} is already empty")
        return await self._submit(name, None)

    async def _submit(self, name: str, iso: str | None) -> JobRecord:
        job_id = self.vms.new_job_id()
        await self.vms.runner.claim(name, Action.MEDIA, job_id)

        async def run(ctx: JobContext) -> dict[str, Any]:
            rec = await self.vms.records.get(name)  # held by this job: it neither starts, stops nor moves
            live = rec.state in _LIVE
            if live:
                if not rec.cdrom_drive:
                    raise WrongState(_NO_HOTPLUG.format(name=name))
                await ctx.progress(0.3, f"{'inserting ' + iso if iso else 'ejecting'} on {rec.host}")
                await self.vms.agents.get(rec.host).change_medium(name, iso)
            await self.vms.records.update(name, lambda r: r.model_copy(update={"cdrom": iso, "cdrom_drive": True}))
            return {"vm": name, "cdrom": iso, "now": live}

        return await self.vms.runner.submit("media", name, run, job_id)


_NO_HOTPLUG = (
    "VM {name!r} has no CD drive and one cannot be added while it runs: stop it, insert the ISO "
    "(that gives it a drive), then start it"
)
