"""Backups in the control plane: generations per VM, retention, restore as a new VM, and daily schedules.

Records (in the store, so every control plane of a cluster sees them)::

    backups/<vm>/<generation>   one generation: its files (one per disk) with their content digests
    backup-policy/<vm>          the VM's schedule (daily at HH:MM) and retention (keep N)

Rules:

* A backup is a job that holds its VM (like every operation), on a running,
  paused or stopped VM. ``incremental`` is honoured when the previous generation
  is on the VM's host and the disk's dirty bitmap carries that generation's name;
  otherwise the backup is full and says why (the job result and the record's
  ``note``). A stopped VM's incremental compares its disk with the previous
  generation (no bitmap needed).
* Every generation is verified on its host before it is recorded (``qemu-img
  check`` and its content digest); a failed backup leaves no file and no record,
  and is an ``error`` event.
* Retention keeps the newest N generations (the VM's ``keep``, else
  ``KASOU_BACKUP_KEEP``, default 7), pruned after each backup: the oldest is merged
  into the next one, which becomes self-contained and still matches its digest.
* Restore makes a new VM (new name, UUID and MAC; the same vCPUs, memory, image
  and networks) whose disks are the generation's content, checked against the
  recorded digest first: a damaged backup is refused and nothing is made.
* Backups outlive their VM: deleting a VM keeps its generations (restore still works).
* A generation belongs to the VM that was backed up: it carries that VM's uuid and department.
  The generations of a name are those of the VM that holds the name now; generations of an
  earlier, deleted VM of the same name are reached by its uuid (``of_uuid``), by users who are not
  confined to departments only, or by name once no VM holds it. A department-scoped user (a
  vendor) reaches only generations of their departments. A name whose generations belong to
  another department cannot be taken by a new VM of that department (``VMService.check_name_free``).
  Generations recorded before kasou kept the uuid count as the current VM's if they are not
  older than it; their department is unknown, which keeps vendors off the name.
* The leader runs due schedules (checked every reconcile tick). A backup that
  could not start within the grace time after its slot is a ``backup_missed``
  event; one that starts late (the control plane was down at the time) runs with a
  ``backup_late`` warning; a failed one is ``backup_failed``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from kasou.agent.models import BackupCreate, BackupMade, BackupPrune, BackupRestore, DiskInfo, TpmRestore
from kasou.control.backup_policy import BackupPolicies, BackupPolicy, PolicyUpdate, PolicyView, effective, full_on
from kasou.control.backup_records import (
    BackupDiskRecord,
    BackupRecord,
    BackupView,
    backup_key,
    backups_prefix,
    belongs,
    plan_sources,
    policy_key,
    to_prune,
    view,
    with_server,
)
from kasou.control.backup_status import WATCH_EVERY_S, WATCH_FIRST_S, watch
from kasou.control.drill import Drills
from kasou.control.jobs import JobContext
from kasou.control.offsite import Offsite
from kasou.control.records import JobRecord, VMRecord, vm_key
from kasou.control.restoring import restore_into
from kasou.errors import AlreadyExists, InvalidSpec, KasouError, NotFound, StoreConflict, WrongState
from kasou.hypervisor.backups import bitmap_name
from kasou.model.firmware import VARS_ID
from kasou.model.retention import Counts
from kasou.model.spec import random_mac, validate_name
from kasou.model.state import VMState
from kasou.model.timeofday import due_slot

if TYPE_CHECKING:
    from collections.abc import Collection

    from kasou.control.base import VMControl, VMView

log = logging.getLogger(__name__)

_BACKUP_STATES = frozenset({VMState.RUNNING, VMState.PAUSED, VMState.STOPPED})
GRACE_S = 3600.0  # a scheduled backup that cannot start within this long after its slot is missed
UNKNOWN_DEPARTMENT = "?"  # the department of a generation recorded before kasou kept it (never a valid name)


# -- the service ------------------------------------------------------------------------------


class Backups:
    def __init__(self, vms: VMControl, clock: Callable[[], float] = time.time) -> None:
        self.vms = vms
        self.clock = clock
        self.grace_s = GRACE_S
        self._locks: dict[str, asyncio.Lock] = {}
        self._watched_at = clock() - WATCH_EVERY_S + WATCH_FIRST_S  # the first look a few minutes after start
        self._watch_task: asyncio.Task[None] | None = None
        self.policies = BackupPolicies(vms.store, vms.records.get, lambda: self.clock())  # schedules, retention
        self.offsite = Offsite(vms)  # the site's backup server, if one is set
        self.drills = Drills(self.offsite)  # restore drills from it (kasou.control.drill)

    def _lock(self, vm: str) -> asyncio.Lock:
        return self._locks.setdefault(vm, asyncio.Lock())

    @property
    def store(self) -> Any:
        return self.vms.store

    async def records(self, vm: str) -> builtins.list[BackupRecord]:
        """The VM's generations, oldest first."""
        return [BackupRecord.model_validate(e.value) for e in await self.store.range(backups_prefix(vm))]

    async def _current(self, vm: str) -> VMRecord | None:
        e = await self.store.get(vm_key(vm))
        return VMRecord.model_validate(e.value) if e is not None else None

    async def _generations(
        self, vm: str, of_uuid: str | None = None, scope: Collection[str] | None = None
    ) -> builtins.list[BackupRecord]:
        """The generations of the VM that holds the name ``vm`` now (with ``of_uuid``: of that VM, deleted
        or not; with no VM of that name: all of the name's), of the departments ``scope`` (None: all).
        An unknown VM is NotFound. Unmarked old generations get the current VM's uuid and department."""
        validate_name(vm)
        if of_uuid is not None:
            try:
                uuid.UUID(of_uuid)
            except ValueError:
                raise InvalidSpec(f"uuid: {of_uuid[:64]!r} is not a VM uuid", field="uuid") from None
        recs = await self.records(vm)
        cur = await self._current(vm)
        if cur is not None:
            recs = [
                r.model_copy(update={"vm_uuid": cur.uuid, "department": cur.department})
                if r.vm_uuid is None and belongs(r, cur) else r for r in recs
            ]  # fmt: skip
        if of_uuid is not None:
            recs = [r for r in recs if r.vm_uuid == of_uuid]
            if not recs:
                raise NotFound(f"no backups of a VM with uuid {of_uuid!r} under the name {vm!r}")
        elif cur is not None:
            recs = [r for r in recs if r.vm_uuid == cur.uuid]
        elif not recs:
            raise NotFound(f"no VM named {vm!r}")
        if scope is not None:
            recs = [r for r in recs if r.department in scope]
        return recs

    async def list(
        self, vm: str, of_uuid: str | None = None, scope: Collection[str] | None = None, server: bool = False
    ) -> builtins.list[BackupView]:
        """The generations of the VM of that name (see :meth:`_generations`), oldest first; ``server``: with
        what the backup server says of their copies (if one is set)."""
        recs = await self._generations(vm, of_uuid, scope)
        by_path = {d.path: r.generation for r in recs for d in r.disks}
        views = [view(r, by_path) for r in recs]
        if not server or not any(v.server_generation is not None for v in views):
            return views
        listing, why = await self.offsite.held(vm)
        return with_server(views, listing, why)

    async def departments_of_name(self, vm: str) -> set[str | None]:
        """The departments of the VMs whose generations carry the name (``UNKNOWN_DEPARTMENT``: an unmarked one)."""
        return {r.department if r.vm_uuid is not None else UNKNOWN_DEPARTMENT for r in await self.records(vm)}

    async def _emit(self, kind: str, vm: str, message: str, severity: Literal["info", "warning", "error"]) -> None:
        with contextlib.suppress(Exception):  # an event that cannot be stored is still in the log
            await self.vms.events.emit(kind, f"vm/{vm}", message, severity)

    # -- policy (kasou.control.backup_policy) -----------------------------------------------

    async def get_policy(self, vm: str) -> PolicyView:
        return await self.policies.get(vm)

    async def set_policy(self, vm: str, upd: PolicyUpdate) -> PolicyView:
        return await self.policies.set(vm, upd)

    # -- create ---------------------------------------------------------------------------

    async def create(self, vm: str, incremental: bool = False, scheduled: bool = False) -> JobRecord:
        """Back the VM up (a job holding the VM)."""
        rec = await self.vms.records.get(vm)
        job_id = "j" + secrets.token_hex(5)

        def claim(r: VMRecord) -> VMRecord:
            if r.job is not None:
                raise WrongState(f"VM {vm!r} is busy with job {r.job}; try again when it ends", job=r.job)
            if r.state not in _BACKUP_STATES:
                raise WrongState(f"VM {vm!r} is {r.state.value}; only a running, paused or stopped VM is backed up")
            if not r.disks or r.host is None:
                raise WrongState(f"VM {vm!r} has no disk to back up")
            return r.model_copy(update={"job": job_id})

        await self.vms.records.update(vm, claim)
        del rec

        async def run(ctx: JobContext) -> dict[str, Any]:
            try:
                return await self._run(ctx, vm, incremental, scheduled)
            except BaseException as e:
                msg = e.message if isinstance(e, KasouError) else f"{type(e).__name__}: {e}"
                what = "scheduled backup" if scheduled else "backup"
                await self._emit("backup_failed", vm, f"{what} of VM {vm} failed: {msg}", "error")
                raise

        return await self.vms.runner.submit("backup", vm, run, job_id)

    async def _run(self, ctx: JobContext, vm: str, incremental: bool, scheduled: bool) -> dict[str, Any]:
        rec = await self.vms.records.get(vm)
        assert rec.host is not None
        agent = self.vms.agents.get(rec.host)
        async with self._lock(vm):
            every = await self.records(vm)
            recs = [r for r in every if belongs(r, rec)]  # an earlier VM of that name is another VM
            prev = recs[-1] if recs else None
            sources, why = plan_sources(rec, prev, incremental)
            gen = max((r.generation for r in every), default=0) + 1
            bid = secrets.token_hex(4)
            await ctx.progress(0.1, f"backing up (generation {gen})")
            t0 = time.monotonic()
            req = BackupCreate(generation=gen, backup_id=bid, disks=sources, tpm_state=rec.tpm_state)
            made: BackupMade = await agent.create_backup(vm, req)
            notes = [why] if why else []
            notes += [f"{f.disk_id}: {f.note}" for f in made.files if f.note]
            kind: Literal["full", "incremental"] = (
                "incremental" if any(f.kind == "incremental" for f in made.files) else "full"
            )
            record = BackupRecord(
                vm=vm, generation=gen, vm_uuid=rec.uuid, department=rec.department, id=bid, host=rec.host, kind=kind,
                created_at=time.time(),
                duration_s=round(time.monotonic() - t0, 3), running=made.running, scheduled=scheduled,
                consistency=made.consistency,
                bitmap=bitmap_name(bid) if all(f.bitmap for f in made.files if f.disk_id != VARS_ID) else None,
                note="; ".join(notes),
                disks=[BackupDiskRecord(disk_id=f.disk_id, path=f.path, backing=f.backing, kind=f.kind,
                                        size_bytes=f.size_bytes, file_bytes=f.file_bytes, bytes_copied=f.bytes_copied,
                                        digest=f.digest, note=f.note) for f in made.files],
                vcpus=rec.vcpus, memory_mib=rec.memory_mib, image=rec.image, nics=rec.nics, cpu=rec.cpu,
                machine=rec.machine, firmware=rec.firmware, os=rec.os, tpm=made.tpm,
            )  # fmt: skip
            try:
                await self.store.create(backup_key(vm, gen), record.model_dump(mode="json"))
            except BaseException:
                for path in [f.path for f in made.files] + ([made.tpm.path] if made.tpm else []):  # no record: no file
                    with contextlib.suppress(KasouError):
                        await agent.delete_backup(path)
                raise
            record = await self._copy_offsite(ctx, rec, record, prev)
            await ctx.progress(0.9, "retention")
            pruned = await self._prune(rec, (await self.policies.effective(rec)).retention)
        return {
            "vm": vm, "generation": gen, "kind": kind, "note": record.note, "pruned": pruned,
            "consistency": made.consistency,
            "bytes_copied": sum(d.bytes_copied for d in record.disks),
            "file_bytes": sum(d.file_bytes for d in record.disks), "copy_s": made.copy_s, "verify_s": made.verify_s,
            "offsite": record.offsite.model_dump() if record.offsite else None, "offsite_error": record.offsite_error,
        }  # fmt: skip

    async def _copy_offsite(
        self, ctx: JobContext, rec: VMRecord, record: BackupRecord, prev: BackupRecord | None
    ) -> BackupRecord:
        """The new generation copied to the backup server (before retention merges its files), recorded either way."""
        try:
            await ctx.progress(0.7, "copying to the backup server")
            copy = await self.offsite.send(rec, record, prev)
        except Exception as e:  # the local generation is good: the copy's failure is an event, not the job's
            msg = e.message if isinstance(e, KasouError) else f"{type(e).__name__}: {e}"
            await self._emit("backup_offsite_failed", rec.name, f"generation {record.generation} of VM {rec.name} was "
                             f"not copied to the backup server: {msg}", "error")  # fmt: skip
            record = record.model_copy(update={"offsite_error": msg})
        else:
            if copy is None:
                return record
            record = record.model_copy(update={"offsite": copy})
        await self.store.put(backup_key(rec.name, record.generation), record.model_dump(mode="json"))
        return record

    async def _prune(self, owner: VMRecord, counts: Counts) -> builtins.list[int]:
        """Drop the VM's generations its retention does not keep (the caller holds the VM's lock), oldest
        first; a dropped incremental's parent data goes into its child, which then rests on what it rested on."""
        vm = owner.name
        recs = [r for r in await self.records(vm) if belongs(r, owner)]
        dropped = []
        for gen in to_prune(recs, counts, self.clock()):
            old = next(r for r in recs if r.generation == gen)  # as an earlier drop may have changed it
            later = [r for r in recs if r.generation > gen]
            child = later[0] if later else None
            agent = self.vms.agents.get(old.host)
            for d in old.disks:
                cd = next((x for x in child.disks if x.backing == d.path), None) if child is not None else None
                await agent.prune_backup(
                    BackupPrune(path=d.path, child=cd.path if cd else None, child_digest=cd.digest if cd else None)
                )
                if child is not None and cd is not None:
                    child = child.model_copy(
                        update={
                            "disks": [
                                x.model_copy(update={"backing": d.backing}) if x is cd else x for x in child.disks
                            ]
                        }
                    )
                    await self.store.put(backup_key(vm, child.generation), child.model_dump(mode="json"))
                    recs = [child if r.generation == child.generation else r for r in recs]
            if old.tpm is not None:
                await agent.delete_backup(old.tpm.path)
            await self.store.delete(backup_key(vm, gen))
            dropped.append(gen)
        return dropped

    # -- restore --------------------------------------------------------------------------

    async def restore(
        self,
        vm: str,
        generation: int,
        new_name: str,
        of_uuid: str | None = None,
        scope: Collection[str] | None = None,
    ) -> tuple[VMView, JobRecord]:
        """A new VM from one generation (a job); checks first, so bad input changes nothing.

        The generation is one of :meth:`_generations` (``of_uuid``, ``scope`` as there); the new VM
        belongs to the department the generation carries."""
        validate_name(new_name)
        recs = await self._generations(vm, of_uuid, scope)
        src = next((r for r in recs if r.generation == generation), None)
        if src is None:
            have = ", ".join(str(r.generation) for r in recs) or "none"
            raise NotFound(f"VM {vm!r} has no backup generation {generation} (it has: {have})")
        await self.vms.check_name_free(new_name, src.department, scope)
        if src.host not in self.vms.agents.names():
            raise WrongState(f"the backup is on host {src.host}, which is not up")
        job_id = "j" + secrets.token_hex(5)
        nics = [n.model_copy(update={"mac": random_mac()}) for n in src.nics]
        rec = VMRecord(
            name=new_name, uuid=str(uuid.uuid4()), vcpus=src.vcpus, memory_mib=src.memory_mib, image=src.image,
            description=f"restored from backup generation {generation} of VM {vm}", nics=nics,
            department=src.department, cpu=src.cpu, machine=src.machine, firmware=src.firmware, os=src.os,
            state=VMState.CREATING, host=src.host, job=job_id,
        )  # fmt: skip
        try:
            await self.store.create(vm_key(new_name), rec.model_dump(mode="json"))
        except StoreConflict:
            await self.vms.check_name_free(new_name, src.department, scope)  # as the caller may hear it
            raise AlreadyExists(f"a VM named {new_name!r} already exists") from None

        async def run(ctx: JobContext) -> dict[str, Any]:
            made: list[str] = []
            agent = self.vms.agents.get(src.host)
            detail = f"restored from backup generation {generation} of VM {vm}"
            try:
                async with self._lock(vm):
                    cur = next((r for r in await self.records(vm) if r.generation == generation), None)
                    if cur is None:
                        raise NotFound(f"backup generation {generation} of VM {vm!r} was pruned meanwhile")
                    by_id = {d.disk_id: d for d in cur.disks}

                    async def disk(disk_id: str) -> DiskInfo:
                        d = by_id[disk_id]
                        return await agent.restore_backup(BackupRestore(
                            vm=new_name, disk_id=disk_id, path=d.path, digest=d.digest,
                            format="raw" if disk_id == VARS_ID else "qcow2",
                        ))  # fmt: skip

                    async def tpm(beside: str, t: Any = cur.tpm) -> str | None:
                        return (await agent.restore_tpm_backup(TpmRestore(path=t.path, digest=t.digest,
                                                                          beside=beside))).tpm_state  # fmt: skip

                    with_tpm = tpm if cur.tpm is not None else None
                    await restore_into(self.vms, ctx, new_name, src.host, list(by_id), disk, with_tpm, made,
                                       "verifying and restoring", detail)  # fmt: skip
                return {"vm": new_name, "from": vm, "generation": generation, "host": src.host}
            except BaseException:
                await self.vms.undo_create(new_name, src.host, made)
                raise

        job = await self.vms.runner.submit("restore", new_name, run, job_id)
        return self.vms.view(rec, None, True), job

    # -- schedules (the leader, every reconcile tick) -------------------------------------

    async def tick(self) -> None:
        """Run each VM's scheduled backup once its slot has come (its own schedule, else its department's);
        every hour, in the background, the watch (:func:`kasou.control.backup_status.watch`)."""
        now = self.clock()
        if now - self._watched_at >= WATCH_EVERY_S and (self._watch_task is None or self._watch_task.done()):
            self._watched_at = now
            self._watch_task = asyncio.create_task(self._watch())  # it may wait on the backup server: not here
        owns = {e.key.removeprefix("backup-policy/"): BackupPolicy.model_validate(e.value)
                for e in await self.store.range("backup-policy/")}  # fmt: skip
        depts = {e.key.removeprefix("backup-policy-dept/"): BackupPolicy.model_validate(e.value)
                 for e in await self.store.range("backup-policy-dept/")}  # fmt: skip
        current = {r.name: r for r in await self.vms.records.all()}
        for vm in sorted(set(owns) | set(current)):
            own, cur = owns.get(vm), current.get(vm)
            if cur is not None and own is not None and own.vm_uuid not in (None, cur.uuid):
                cur = None  # the schedule of an earlier VM of the name: that VM is gone
            last = own.last_slot if own is not None else None
            if cur is None:
                if own is not None and own.daily is not None and not own.off:
                    slot = due_slot(own.daily, now, own.set_at, last)
                    if slot is not None:
                        await self._gone(vm, slot)
                continue
            eff = effective(own, depts.get(cur.department or ""), cur.department, cur.criticality)
            slot = due_slot(eff.daily, now, eff.set_at, last) if eff.daily is not None else None
            if slot is not None:
                await self._run_slot(vm, cur, slot, now, full_on(eff.weekly, slot))

    async def _watch(self) -> None:
        try:
            await watch(self)
        except Exception:  # the watch is advice: a failure is logged, the next hour tries again
            log.exception("the backup watch failed")

    async def _gone(self, vm: str, slot: float) -> None:
        when = datetime.fromtimestamp(slot).strftime("%Y-%m-%d %H:%M")
        await self._emit("backup_missed", vm, f"scheduled backup of VM {vm} due {when} did not run: the VM "
                         "no longer exists; its schedule is removed", "error")  # fmt: skip
        await self.store.delete(policy_key(vm))

    async def _run_slot(self, vm: str, cur: VMRecord, slot: float, now: float, full: bool) -> None:
        late = now - slot
        when = datetime.fromtimestamp(slot).strftime("%Y-%m-%d %H:%M")
        try:
            job = await self.create(vm, incremental=not full, scheduled=True)
        except NotFound:
            return  # deleted meanwhile: the next tick sees it gone
        except KasouError as err:
            if late <= self.grace_s and isinstance(err, WrongState) and "busy" in err.message:
                return  # try again next tick
            await self._emit("backup_missed", vm, f"scheduled backup of VM {vm} due {when} did not run: "
                             f"{err.message}", "error")  # fmt: skip
            await self._mark(cur, slot)
            return
        await self._mark(cur, slot)
        if late > self.grace_s:
            await self._emit("backup_late", vm, f"scheduled backup of VM {vm} due {when} was missed "
                             f"(the control plane was not running); it runs now, {late / 3600:.1f} h late "
                             f"(job {job.id})", "warning")  # fmt: skip

    async def _mark(self, owner: VMRecord, slot: float) -> None:
        """The slot is handled (kept in the VM's own record, made if its schedule is its department's)."""
        e = await self.store.get(policy_key(owner.name))
        p = BackupPolicy.model_validate(e.value) if e is not None else BackupPolicy(vm_uuid=owner.uuid, set_at=0.0)
        p = p.model_copy(update={"last_slot": slot})
        with contextlib.suppress(StoreConflict):
            if e is None:
                await self.store.create(policy_key(owner.name), p.model_dump(mode="json"))
            else:
                await self.store.put(policy_key(owner.name), p.model_dump(mode="json"), expect_rev=e.mod_rev)
