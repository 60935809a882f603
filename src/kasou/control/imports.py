"""Bringing existing systems in (``kasou vm import``) and out (``kasou vm export``), in Ganeti's phases.

Import:

1. check the request (:meth:`kasou.model.imports.VMImport.check`): names, one kind of source;
2. prerequisites, with no side effect: the name is free, the network and pool exist; the agents of the
   hosts look at the files (:meth:`AgentClient.inspect_import`: formats, sizes, the OVF descriptor) and
   the host is the one that has them (the scheduler's pick if several do); the hardware maps onto a VM
   (:func:`kasou.model.imports.plan_import`, which refuses with the list of what does not) and the pool
   has room for every disk's whole virtual size;
3. claim the name: a record in state ``creating``;
4. a job converts each disk on that host (``qemu-img convert`` into the pool, followed by polling the
   agent's transfer for its progress), records the disks as they are made (so a restart of the control
   plane removes them), then the VM is ``stopped`` (or started). Any failure or a cancel removes the
   disks made so far and the record: nothing is left.

Export: a stopped VM's disks become streamOptimized vmdk files in an OVA with its OVF descriptor and a
SHA256 manifest, written on the VM's host in its transfer directory; the VM is held by the job so that
nobody starts it meanwhile.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

from kasou.agent.models import (
    DiskImport,
    ExportCreate,
    ExportDiskSource,
    FirmwareCreate,
    FirmwareFiles,
    GuestConvert,
    TransferStatus,
)
from kasou.control import scheduler
from kasou.control.base import VMControl
from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, LedgerEvent, VMRecord, vm_key
from kasou.control.vm_create import cpu_and_machine, place_new, undo_create
from kasou.errors import (
    AgentUnavailable,
    AlreadyExists,
    InsufficientResources,
    InvalidSpec,
    KasouError,
    NotFound,
    OperationTimeout,
    StoreConflict,
    from_dict,
)
from kasou.model.imports import (
    ImportInspect,
    ImportPlan,
    ImportSource,
    VMImport,
    check_firmware,
    check_transfer_path,
    conversion_lines,
    plan_import,
)
from kasou.model.ovf_write import ExportNic, OvfExport
from kasou.model.pools import DEFAULT_POOL
from kasou.model.spec import DiskSpec, NicSpec, random_mac
from kasou.model.state import Action, VMState
from kasou.model.units import format_size

if TYPE_CHECKING:
    from kasou.agent.client import AgentClient
    from kasou.control.base import VMView
    from kasou.control.ha import HaManager
    from kasou.control.pools import PoolRecord, Pools

POLL_S = 1.0  # a long poll: the agent answers at once when the transfer ends, else after this (progress)
STALL_S = 1800.0  # no progress this long: the host's conversion is stuck (its agent says the same)


class ImportVMs(VMControl, Protocol):
    """What imports and exports use of :class:`kasou.control.vms.VMService`."""

    ha: HaManager
    pools: Pools


class Imports:
    def __init__(self, vms: ImportVMs) -> None:
        self.vms = vms

    # -- import ------------------------------------------------------------------------------------

    async def import_vm(
        self, req: VMImport, scope: Collection[str] | None = None
    ) -> tuple[VMView, JobRecord, ImportPlan]:
        """Define a VM from disk files or an OVF/OVA; returns at once with the plan, the disks are made by a job."""
        svc = self.vms
        req.check()
        await svc.check_name_free(req.name, req.department, scope)
        vlan = await svc.networks.resolve(req.network, req.department, scope)
        isolated = await svc.networks.is_isolated(req.network)
        await svc.check_group(req.anti_affinity, req.department, scope)
        pool = await self._pool(req.pool or DEFAULT_POOL)
        if req.ha:
            await svc.ha.check_storage(req.name, "local", [pool.name], None)
        found = await self._inspect(req)
        plan = plan_import(req, next(iter(found.values())))
        check_firmware(req, plan)
        host = await self._place(req, plan, self._converters(req, found))
        plan.cpu, plan.machine = await cpu_and_machine(svc, req, host)
        job_id = svc.new_job_id()
        rec = VMRecord(
            name=req.name, uuid=str(uuid.uuid4()), vcpus=plan.vcpus, memory_mib=plan.memory_mib, image=None,
            cpu=plan.cpu, machine=plan.machine, firmware=plan.firmware,
            description=req.description, department=req.department, anti_affinity=req.anti_affinity, ha=req.ha,
            priority=req.priority, state=VMState.CREATING, host=host, job=job_id,
            nics=[NicSpec(id=n.id, mac=random_mac(), network=n.network, vlan=vlan, isolated=isolated)
                  for n in plan.nics],
        )  # fmt: skip
        if req.start:
            await svc.admit(rec)
        room = svc.pools.reserve([(pool.name, host, d.size_bytes, d.size_bytes) for d in plan.disks])
        await room.__aenter__()  # no room for the disks' virtual size: refused here, with the numbers
        try:
            try:
                await svc.store.create(vm_key(req.name), rec.model_dump(mode="json"))
            except StoreConflict:
                await svc.check_name_free(req.name, req.department, scope)
                raise AlreadyExists(f"a VM named {req.name!r} already exists") from None
        except BaseException:
            await room.__aexit__(None, None, None)
            raise

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                return await self._convert(ctx, req, plan, host, pool)
            finally:
                await room.__aexit__(None, None, None)

        job = await svc.runner.submit("import", req.name, run, job_id)
        return svc.view(rec, None, True), job, plan

    async def _pool(self, name: str) -> PoolRecord:
        try:
            return await self.vms.pools.get_record(name)
        except NotFound as e:
            raise InvalidSpec(e.message, field="pool") from None

    async def _inspect(self, req: VMImport) -> dict[str, ImportSource]:
        """The hosts whose transfer directory holds the files, and what each found there."""
        agents = self.vms.agents
        await agents.refresh()
        hosts = agents.names()
        if req.host is not None:
            if req.host not in hosts:
                raise InvalidSpec(f"host {req.host!r} is not up (hosts up: {', '.join(hosts) or 'none'})", field="host")
            hosts = [req.host]
        body = ImportInspect(disks=req.disks or [], ova=req.ova, ovf=req.ovf)
        found: dict[str, ImportSource] = {}
        first: KasouError | None = None
        for h in hosts:
            try:
                found[h] = await agents.get(h).inspect_import(body)
            except NotFound as e:  # not on this host: perhaps on another
                first = first or e
            except (AgentUnavailable, OperationTimeout) as e:
                first = first or e
        if not found:
            raise first or NotFound(f"no host has {req.source} in its transfer directory")
        return found

    @staticmethod
    def _converters(req: VMImport, found: dict[str, ImportSource]) -> list[str]:
        """The hosts that can take the import: with ``--convert``, those with virt-v2v (refused if none)."""
        if not req.convert:
            return list(found)
        able = [h for h, src in found.items() if src.v2v]
        if not able:
            raise InvalidSpec(f"--convert needs virt-v2v on host {', '.join(found)}: apt-get install virt-v2v "
                              "nbdkit", field="convert")  # fmt: skip
        return able

    async def _place(self, req: VMImport, plan: ImportPlan, candidates: list[str]) -> str:
        """The host to import onto: one that has the files, by the scheduler's rules."""
        loads = await self.vms.check_fits_some_host(plan.vcpus, plan.memory_mib)
        loads = [ld for ld in loads if ld.name in candidates]
        if not loads:
            raise InsufficientResources(f"no host that has {req.source} can take a VM of {plan.vcpus} vCPUs and "
                                        f"{plan.memory_mib} MiB now")  # fmt: skip
        want = scheduler.Request(req.name, plan.memory_mib, plan.vcpus, req.anti_affinity)
        return await place_new(self.vms, want, loads, req.start)

    async def _convert(
        self, ctx: JobContext, req: VMImport, plan: ImportPlan, host: str, pool: PoolRecord
    ) -> dict[str, Any]:
        svc = self.vms
        agent = svc.agents.get(host)
        made: list[str] = []
        running: str | None = None
        share = 0.45 if req.convert else 0.95  # of the job's progress: the disks' conversion to qcow2
        try:
            total = plan.virtual_bytes or 1
            done = 0
            disks: list[DiskSpec] = []
            for d in plan.disks:
                what = d.source.file if d.source else "an empty disk"
                await ctx.progress(share * done / total, f"{d.id}: {what}")
                st = await agent.start_import(DiskImport(
                    vm=req.name, disk_id=d.id, source=d.source, size_bytes=d.size_bytes, shared=pool.shared,
                    pool=pool.name if pool.path is not None else None, pool_path=pool.path,
                ))  # fmt: skip
                running = st.id
                made += st.targets
                partial = [*disks, DiskSpec(id=d.id, size_bytes=d.size_bytes, path=st.targets[0], pool=pool.name)]
                await svc.records.set(req.name, disks=partial)  # a restart of the control plane removes it too
                final = await follow(ctx, agent, st, share * done / total, share * d.size_bytes / total, d.id)
                running = None
                info = final.result or {}
                disks.append(DiskSpec(
                    id=d.id, size_bytes=int(info["size_bytes"]), format=str(info["format"]), path=str(info["path"]),
                    shared=pool.shared, pool=pool.name,
                ))  # fmt: skip
                done += d.size_bytes
            conversion: dict[str, Any] | None = None
            if req.convert:  # virt-v2v in place: VMware's drivers and tools out, virtio in
                st = await agent.start_convert(GuestConvert(vm=req.name, disks=[d.path or "" for d in disks]))
                running = st.id
                final = await follow(ctx, agent, st, share, 0.95 - share, "virt-v2v")
                running = None
                conversion = final.result or {}
                plan.converted = conversion_lines(conversion)
            files = FirmwareFiles()
            if plan.firmware != "bios" or plan.tpm:  # its UEFI variables and TPM, beside its boot disk
                await ctx.progress(0.96, "making its UEFI variable store and TPM")
                files = await agent.create_firmware(FirmwareCreate(
                    vm=req.name, beside=disks[0].path or "", firmware=plan.firmware, tpm=plan.tpm,
                ))  # fmt: skip
                made += [p for p in (files.nvram, files.tpm_state) if p]
            cur = await svc.records.set(req.name, state=VMState.STOPPED, disks=disks, nvram=files.nvram,
                                        tpm_state=files.tpm_state)  # fmt: skip
            detail = (f"imported from {plan.source}: {plan.vcpus} vCPU, {plan.memory_mib} MiB, {len(disks)} disk"
                      f"{'s' if len(disks) != 1 else ''}, {format_size(plan.virtual_bytes)}"
                      f"{', converted by virt-v2v' if conversion is not None else ''}")  # fmt: skip
            await svc.ledger.record(req.name, LedgerEvent.DEFINED, host, detail)
            if req.start:
                await ctx.progress(0.97, "starting")
                await svc.start_now(cur)
            await ctx.progress(1.0, "done")
            res: dict[str, Any] = {
                "vm": req.name,
                "host": host,
                "disks": [d.model_dump() for d in disks],
                "report": plan.report(),
            }
            if conversion is not None:
                res["conversion"] = conversion
            return res
        except BaseException:
            if running is not None:
                with contextlib.suppress(KasouError):
                    await agent.cancel_transfer(running)
            await undo_create(svc, req.name, host, made)
            raise

    # -- export ------------------------------------------------------------------------------------

    async def export_vm(self, name: str, file: str) -> JobRecord:
        """Write a stopped VM as an OVA (``file``, in its host's transfer directory), as a job."""
        svc = self.vms
        check_transfer_path(file, "ova")
        if not file.endswith(".ova"):
            raise InvalidSpec(f"{file}: an OVA's name ends in .ova", field="ova")
        rec = await svc.records.get(name)
        if not rec.disks or any(d.path is None for d in rec.disks):
            raise InvalidSpec(f"VM {name!r} has no disk to export", field="name")
        job_id = svc.new_job_id()
        rec = await svc.runner.claim(name, Action.EXPORT, job_id)
        body = ExportCreate(
            vm=name, file=file,
            disks=[ExportDiskSource(id=d.id, path=d.path or "", format=d.format) for d in rec.disks],
            ovf=OvfExport(name=name, vcpus=rec.vcpus, memory_mib=rec.memory_mib, description=rec.description,
                          firmware="bios" if rec.firmware == "bios" else "efi",
                          secure_boot=rec.firmware == "uefi-secure",
                          disks=[], nics=[ExportNic(network=n.network) for n in rec.nics]),
        )  # fmt: skip
        agent = svc.agents.get(rec.host)
        try:
            st = await agent.start_export(body)  # refused now (the file exists, no such directory): no job
        except BaseException:
            await svc.records.update(name, lambda r: r.model_copy(update={"job": None}) if r.job == job_id else None)
            raise

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                final = await follow(ctx, agent, st, 0.0, 1.0, "export")
            except BaseException:
                with contextlib.suppress(KasouError):
                    await agent.cancel_transfer(st.id)
                raise
            result = dict(final.result or {})
            warnings = []
            if rec.image is not None:
                warnings.append(f"VM {name!r} boots kasou's image {rec.image!r} (its kernel, not its disk): the "
                                "exported disks hold no boot loader of their own")  # fmt: skip
            return {"vm": name, "host": rec.host, **result, "warnings": warnings}

        return await svc.runner.submit("export", name, run, job_id)


async def follow(
    ctx: JobContext, agent: AgentClient, st: TransferStatus, base: float, span: float, label: str
) -> TransferStatus:
    """Follow an agent's transfer to its end, passing its progress on to the job; its error is raised."""
    last, since = -1.0, time.monotonic()
    while True:
        if st.state == "succeeded":
            with contextlib.suppress(KasouError):
                await agent.cancel_transfer(st.id)  # forget it (nothing to remove)
            return st
        if st.state == "failed":
            with contextlib.suppress(KasouError):
                await agent.cancel_transfer(st.id)
            raise from_dict(st.error or {"message": "the transfer failed"})
        await ctx.progress(base + span * st.progress, f"{label}: {st.step}" if st.step else label)
        if st.progress > last:
            last, since = st.progress, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            raise OperationTimeout(f"{label}: no progress on host {agent.host} for {STALL_S:.0f} s")
        st = await agent.transfer(st.id, wait_s=POLL_S)
