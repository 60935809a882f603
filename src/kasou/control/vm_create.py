"""Creating a VM: the prerequisites (name, network, room on a host and in its pools), then a job that
makes its disks (two copies for a mirrored disk) and, if asked, starts it; a failure leaves nothing.

Part of :class:`kasou.control.vms.VMService` (``VMService.create`` calls :func:`create`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING, Any, Protocol

from kasou.agent.models import DiskCreate, FirmwareCreate, FirmwareFiles
from kasou.control import scheduler
from kasou.control.base import VMControl
from kasou.control.jobs import JobContext
from kasou.control.media import disk_image, hosts_with_iso, iso_info
from kasou.control.mirrors import launch_disk
from kasou.control.pools import PoolRecord
from kasou.control.records import JobRecord, LedgerEvent, VMRecord, vm_key
from kasou.errors import (
    AgentUnavailable,
    AlreadyExists,
    InsufficientResources,
    InvalidSpec,
    KasouError,
    NotFound,
    OperationTimeout,
    StoreConflict,
)
from kasou.hypervisor.base import LaunchSpec, RuntimeState
from kasou.model.cloudinit import clone_seed
from kasou.model.devices import HOTPLUG_PORTS
from kasou.model.firmware import check_memory, check_template, resolve
from kasou.model.imports import VMImport
from kasou.model.machine import DEFAULT_CPU, DEFAULT_MACHINE, KVM_ONLY_CPUS, pinned_machine
from kasou.model.pools import DEFAULT_POOL
from kasou.model.spec import DiskSpec, MirrorCopy, NicSpec, VMCreate, random_mac
from kasou.model.state import VMState

if TYPE_CHECKING:
    from kasou.control.base import VMView
    from kasou.control.ha import HaManager
    from kasou.control.pools import Pools


class CreateVMs(VMControl, Protocol):
    """What creating a VM uses of :class:`kasou.control.vms.VMService`."""

    ha: HaManager
    pools: Pools


async def cpu_and_machine(svc: VMControl, spec: VMCreate | VMImport, host: str | None) -> tuple[str, str]:
    """The VM's CPU model (the default unless asked) and its machine type, pinned to the versioned q35 of
    the QEMU on ``host`` unless asked. ``host`` (the hosts' own CPU) needs KVM on every host: refused where
    one runs TCG, with the hosts named."""
    cpu = spec.cpu or DEFAULT_CPU
    if cpu in KVM_ONLY_CPUS:
        tcg = []
        for name in svc.agents.names():
            with contextlib.suppress(AgentUnavailable, OperationTimeout):
                if (await svc.agents.get(name).host_info()).accelerator != "kvm":
                    tcg.append(name)
        if tcg:
            raise InvalidSpec(
                f"CPU model {cpu!r} needs KVM on every host it may run on; {', '.join(sorted(tcg))} "
                f"run{'s' if len(tcg) == 1 else ''} without it: choose {DEFAULT_CPU} (the default)",
                field="cpu",
            )
    machine = spec.machine
    if machine is None:
        machine = DEFAULT_MACHINE
        if host is not None:
            with contextlib.suppress(AgentUnavailable, OperationTimeout):
                machine = pinned_machine((await svc.agents.get(host).host_info()).qemu_version)
    return cpu, machine


async def place_new(svc: VMControl, req: scheduler.Request, loads: list[scheduler.HostLoad], start: bool) -> str:
    """The host a new VM (created, imported, restored) is made on: :func:`kasou.control.scheduler.place_new`, the
    VMs defined on each host counted (templates never run). One that is not started needs only disk space now
    (it is admitted when started): when no host could run it now, the host with the most memory left for the
    VMs defined there."""
    defined: dict[str, int] = {}
    for r in await svc.records.all():
        if r.host and r.state != VMState.TEMPLATE:
            defined[r.host] = defined.get(r.host, 0) + r.memory_mib + scheduler.VM_OVERHEAD_MIB
    try:
        return scheduler.place_new(req, loads, defined, svc.vcpu_ratio).name
    except InsufficientResources:
        if start or not loads:
            raise
        return max(loads, key=lambda h: h.memory_capacity_mib - defined.get(h.name, 0)).name


async def create(svc: CreateVMs, spec: VMCreate, scope: Collection[str] | None = None) -> tuple[VMView, JobRecord]:
    """Define a VM (and start it if asked). Returns at once; the disks are made by a job.

    ``scope``: the departments the asking user is confined to (None: not confined)."""
    spec.check()
    await svc.check_name_free(spec.name, spec.department, scope)
    vlan = await svc.networks.resolve(spec.network, spec.department, scope)
    isolated = await svc.networks.is_isolated(spec.network)
    await svc.check_group(spec.anti_affinity, spec.department, scope)
    if spec.ha:  # in a cluster HA restarts it on another host: refused for a disk only its own host reaches
        await svc.ha.check_storage(spec.name, spec.storage, spec.mirror or [spec.pool or DEFAULT_POOL], spec.template)
    loads = await svc.check_fits_some_host(spec.vcpus, spec.memory_mib)
    template: VMRecord | None = None
    image_details: dict[str, Any] | None = None  # of the image the disk is copied from
    if spec.template is not None:
        try:
            template = await svc.records.get(spec.template)
        except NotFound:
            raise InvalidSpec(f"unknown template {spec.template!r}", field="template") from None
        if template.state != VMState.TEMPLATE:
            raise InvalidSpec(
                f"{spec.template!r} is not a template; make it one with: kasou vm template {spec.template}",
                field="template",
            )
        host = template.host  # a linked clone lives where its template's disks are
        image = template.image
        have = (template.firmware, template.tpm_state is not None, template.os)
        check_template(template.name, have, (spec.firmware, spec.tpm, spec.os))
        firmware, tpm, guest_os = have
        cloud_init = clone_seed(template.cloud_init, spec.cloud_init)
    else:
        cloud_init = spec.cloud_init
        image = spec.image
        firmware, tpm, guest_os = resolve(spec.firmware, spec.tpm, spec.os)
        if spec.cdrom is not None:  # only a host with the ISO in its image store can run it with the disc in
            loads = await hosts_with_iso(svc, loads, spec.cdrom)
        req = scheduler.Request(spec.name, spec.memory_mib, spec.vcpus, spec.anti_affinity)
        host = await place_new(svc, req, loads, spec.start)
        if image is not None:
            image_details = await disk_image(svc.agents.get(host), host, image)
            least = int(image_details.get("min_memory_mib", 0))
            if spec.memory_mib < least:
                raise InvalidSpec(
                    f"image {image!r} needs at least {least} MiB of memory to boot, not {spec.memory_mib}; "
                    f"give --memory {least} or more",
                    field="memory_mib",
                )
    if spec.cdrom is not None:
        await iso_info(svc.agents.get(host), host, spec.cdrom)
    check_memory(firmware, spec.memory_mib)
    cpu, machine = await cpu_and_machine(svc, spec, host)
    job_id = svc.new_job_id()
    rec = VMRecord(
        name=spec.name,
        uuid=str(uuid.uuid4()),
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        image=image,
        cpu=cpu,
        machine=machine,
        firmware=firmware,
        os=guest_os,
        template=spec.template,
        cdrom_drive=spec.cdrom is not None,
        cdrom=spec.cdrom,
        boot=spec.boot_list,
        description=spec.description,
        department=spec.department,
        criticality=spec.criticality,
        anti_affinity=spec.anti_affinity,
        ha=spec.ha,
        priority=spec.priority,
        startup=spec.startup,
        tags=spec.tags,
        cloud_init=cloud_init,
        replicated=spec.storage == "replicated",
        nics=[NicSpec(id="net0", mac=random_mac(), network=spec.network, vlan=vlan, isolated=isolated)],
        state=VMState.CREATING,
        host=host,
        job=job_id,
    )
    if spec.start:
        await svc.admit(rec)
    pools, room = await disk_pools(svc, spec, host, image_details)
    await room.__aenter__()  # a pool without room for the disk refuses the create here, with its numbers
    try:
        try:
            await svc.store.create(vm_key(spec.name), rec.model_dump(mode="json"))
        except StoreConflict:
            await svc.check_name_free(spec.name, spec.department, scope)  # says it as the caller may hear it
            raise AlreadyExists(f"a VM named {spec.name!r} already exists") from None
        if not await svc.networks.usable(spec.network):  # deleted since it was resolved above
            await svc.store.delete(vm_key(spec.name))
            raise InvalidSpec(f"network {spec.network!r} was deleted meanwhile", field="network")
    except BaseException:
        await room.__aexit__(None, None, None)
        raise

    async def run(ctx: JobContext) -> dict[str, Any]:
        async with _release_after(room):
            return await make(ctx)

    async def make(ctx: JobContext) -> dict[str, Any]:
        made: list[str] = []
        try:
            await ctx.progress(0.1, "creating disk")
            agent = svc.agents.get(host)
            if template is not None:
                base = template.disks[0]
                dreq = DiskCreate(
                    vm=spec.name,
                    disk_id="disk0",
                    size_bytes=spec.disk_bytes,
                    source="overlay",
                    backing=base.path,
                )
            else:
                dreq = DiskCreate(
                    vm=spec.name,
                    disk_id="disk0",
                    size_bytes=spec.disk_bytes,
                    source="image" if image is not None else "blank",  # blank: an OS is installed from --cdrom
                    image=image,
                    shared=spec.storage == "shared" or pools[0].shared,
                    pool=pools[0].name if pools[0].path is not None else None,
                    pool_path=pools[0].path,
                )
            info = await agent.create_disk(dreq)
            made.append(info.path)
            mirror = None
            if len(pools) == 2:  # RAID-1: the second copy is made the same way, so the two start equal
                await ctx.progress(0.3, f"creating the disk's second copy in pool {pools[1].name}")
                second = await agent.create_disk(dreq.model_copy(update={
                    "pool": pools[1].name, "pool_path": pools[1].path, "shared": pools[1].shared,
                }))  # fmt: skip
                made.append(second.path)
                mirror = MirrorCopy(pool=pools[1].name, path=second.path, state="in_sync", clean=True,
                                    since=time.time())  # fmt: skip
            disk = DiskSpec(
                id="disk0",
                size_bytes=info.size_bytes,
                format=info.format,
                path=info.path,
                backing=info.backing if template is not None else None,
                linked=template is not None,
                shared=dreq.shared,
                pool=pools[0].name,
                mirror=mirror,
            )
            disks = [disk]
            for n, size in enumerate(spec.data_disks, start=1):  # empty data disks beside it, on hot-plug ports
                await ctx.progress(0.3, f"creating data disk disk{n}")
                data = await agent.create_disk(DiskCreate(
                    vm=spec.name, disk_id=f"disk{n}", size_bytes=size, source="blank", shared=dreq.shared,
                    pool=pools[0].name if pools[0].path is not None else None, pool_path=pools[0].path,
                ))  # fmt: skip
                made.append(data.path)
                disks.append(DiskSpec(id=f"disk{n}", size_bytes=data.size_bytes, format=data.format, path=data.path,
                                      shared=dreq.shared, pool=pools[0].name,
                                      port=n if n <= HOTPLUG_PORTS else None))  # fmt: skip
            files = FirmwareFiles()
            if firmware != "bios" or tpm:  # its UEFI variables and TPM, beside its disk
                await ctx.progress(0.4, "making its UEFI variable store and TPM")
                files = await agent.create_firmware(FirmwareCreate(
                    vm=spec.name, beside=info.path, firmware=firmware, tpm=tpm,
                    vars_of=template.nvram if template is not None else None,
                ))  # fmt: skip
                made += [p for p in (files.nvram, files.tpm_state) if p]
            cur = await svc.records.set(spec.name, state=VMState.STOPPED, disks=disks, nvram=files.nvram,
                                        tpm_state=files.tpm_state)  # fmt: skip
            await svc.ledger.record(spec.name, LedgerEvent.DEFINED, host, _defined_detail(spec, vlan))
            if spec.start:
                await ctx.progress(0.5, "starting")
                await svc.start_now(cur)
            await ctx.progress(1.0, "done")
            return {"vm": spec.name, "host": host}
        except BaseException:
            await undo_create(svc, spec.name, host, made)
            raise

    job = await svc.runner.submit("create", spec.name, run, job_id)
    return svc.view(rec, None, True), job


async def disk_pools(
    svc: CreateVMs, spec: VMCreate, host: str | None, image: dict[str, Any] | None
) -> tuple[list[PoolRecord], contextlib.AbstractAsyncContextManager[None]]:
    """The pools of the new VM's disk (two if mirrored) and the room held in them, checked now (``image``: the
    details of the image its disk is copied from, None for a clone or a blank disk)."""
    names = spec.mirror or [spec.pool or DEFAULT_POOL]
    try:
        pools = [await svc.pools.get_record(n) for n in names]
    except NotFound as e:
        raise InvalidSpec(e.message, field="mirror" if spec.mirror else "pool") from None
    if len(pools) == 2 and pools[0].shared != pools[1].shared:
        raise InvalidSpec("both copies of a mirror must be on shared pools or both on local ones", field="mirror")
    if spec.storage == "shared" or spec.template is not None or host is None or image is None:
        return pools, contextlib.nullcontext()  # the shared directory, or an overlay on its template's disk
    size = max(spec.disk_bytes or 0, int(image["disk_size_bytes"]))
    data = [(pools[0].name, host, s, 0) for s in spec.data_disks]
    room = svc.pools.reserve([(p.name, host, size, int(image["allocated_bytes"])) for p in pools] + data)
    return pools, room


def launch_spec(rec: VMRecord) -> LaunchSpec:
    """What the VM's host needs to run it (``VMService.launch_spec``)."""
    return LaunchSpec(
        name=rec.name,
        uuid=rec.uuid,
        vcpus=rec.vcpus,
        memory_mib=rec.memory_mib,
        image=rec.image,
        cpu=rec.cpu,
        machine=rec.machine or DEFAULT_MACHINE,
        firmware=rec.firmware,
        nvram=rec.nvram,
        tpm_state=rec.tpm_state,
        os=rec.os,
        cdrom_drive=rec.cdrom_drive,
        cdrom=rec.cdrom,
        boot=rec.boot,  # type: ignore[arg-type]  # checked by parse_boot when it was recorded
        cloud_init=rec.cloud_init,
        disks=[launch_disk(rec, d) for d in rec.disks],
        nics=rec.nics,
        ha=rec.ha,
        pci_ports=rec.pci_ports or 0,
    )


async def undo_create(svc: CreateVMs, name: str, host: str | None, disk_paths: list[str]) -> None:
    """Leave nothing of a failed create: no process, no disk, no record, no ledger."""
    with contextlib.suppress(KasouError):
        agent = svc.agents.get(host)
        with contextlib.suppress(KasouError):
            info = await agent.info(name)
            if info.state not in (RuntimeState.EXITED, RuntimeState.CRASHED):
                await agent.action(name, "stop")
        with contextlib.suppress(KasouError):
            await agent.forget(name)
        for p in disk_paths:
            with contextlib.suppress(KasouError):
                await agent.delete_disk(p)
    await svc.store.delete(vm_key(name))
    await svc.ledger.forget(name)


@contextlib.asynccontextmanager
async def _release_after(room: contextlib.AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
    """Hold the room taken in a pool (entered already) until the body ends."""
    try:
        yield
    finally:
        await room.__aexit__(None, None, None)


def _defined_detail(spec: VMCreate, vlan: int | None = None) -> str:
    src = f"linked clone of {spec.template}" if spec.template else f"image {spec.image}"
    if spec.image is None and spec.template is None:
        src = f"blank disk {spec.disk}"
    if spec.cdrom is not None:
        src += f", ISO {spec.cdrom} in its CD drive"
    net = f", network {spec.network}" + (f" (VLAN {vlan})" if vlan is not None else "")
    return f"{spec.vcpus} vCPU, {spec.memory_mib} MiB, {src}{net}"
