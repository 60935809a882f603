"""What the VM sub-services share: the VM record store, the job runner, and the narrow view of
:class:`kasou.control.vms.VMService` they type against.

:class:`VMService` builds the sub-services (snapshots, backups, HA, mirrors, pools, desktops,
replication) and hands them itself; they see it only as a :class:`VMControl`, so no sub-service
imports ``kasou.control.vms`` and there is no import circle. Every change of a VM's record goes
through :class:`VMRecords` (a compare-and-swap on the record), and every job that works on one VM
through :class:`VMJobRunner` (claim the VM, run the job, release the VM when it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from kasou.control.jobs import JobContext, Jobs
from kasou.control.records import JobRecord, LedgerEvent, VMRecord, vm_key
from kasou.errors import NotFound, StoreConflict, WrongState
from kasou.model.spec import MirrorCopy, NicSpec, Startup, VMCreate, validate_name
from kasou.model.state import Action, VMState, check_action

if TYPE_CHECKING:
    from kasou.control import scheduler
    from kasou.control.events import Events
    from kasou.control.hosts import Agents
    from kasou.control.ledger import Ledger
    from kasou.control.networks import Networks
    from kasou.hypervisor.base import LaunchSpec, RuntimeInfo


class DiskView(BaseModel):
    id: str
    size_bytes: int
    format: str
    path: str | None
    backing: str | None
    linked: bool
    shared: bool = False
    pool: str = "default"
    mirror: MirrorCopy | None = None  # a mirrored disk's second copy: pool, path, state (syncing, in_sync, degraded)
    port: int | None = None  # its hot-plug port (None: the root bus, unplugged only while the VM is stopped)


class ReplicaView(BaseModel):
    host: str
    state: str  # syncing, in_sync, degraded
    since: float


class GuestView(BaseModel):
    """What a running guest says of itself through its QEMU guest agent."""

    agent: bool = False  # its guest agent answers
    agent_age_s: float | None = None  # seconds since it last answered (None: not since the guest started)
    os: str | None = None
    hostname: str | None = None
    ips: list[str] = []  # its addresses, loopback and link-local left out


class VMView(BaseModel):
    """A VM as the API and the CLI show it: the record and its host's live view, merged."""

    name: str
    uuid: str  # made at create; what belongs to the VM (backups, jobs, history, console log) carries it
    state: VMState
    host: str | None
    vcpus: int
    memory_mib: int
    image: str | None
    cpu: str | None = None  # virtual CPU model (None: QEMU's default, a VM made before kasou named one)
    machine: str | None = None  # pinned q35 machine type (None: the q35 alias)
    firmware: str = "bios"  # bios, uefi or uefi-secure
    tpm: bool = False  # it has a TPM 2.0
    os: str | None = None  # linux, windows or other (None: not said)
    nvram: str | None = None  # its UEFI variable store, beside its first disk
    tpm_state: str | None = None  # its TPM's state directory, beside its first disk
    template: str | None
    cdrom_drive: bool = False  # it has a CD drive
    cdrom: str | None = None  # the ISO image in its CD drive (None: empty, or no drive)
    boot: list[str] | None = None  # the firmware's boot order (None: disk, then CD)
    description: str
    department: str | None = None
    criticality: str | None = None
    anti_affinity: str | None
    ha: bool
    priority: int
    startup: Startup | None = None  # started when its host boots: in which order, after what delay
    tags: list[str] = []
    cloud_init: dict[str, Any] | None = None  # its NoCloud seed: hostname, address, keys (user-data: only whether)
    storage: str  # local, shared or replicated
    replica: ReplicaView | None
    ha_armed: bool  # HA could restart it on another host if its host failed now (see ha_blocked)
    ha_blocked: str | None = None  # an HA VM that is not armed: why (disk local, replica not in sync, ...)
    disks: list[DiskView]
    nics: list[NicSpec]
    next_start: dict[str, int] = {}  # vCPUs and memory set while it ran: applied at its next start
    guest_ready: bool
    uptime_s: float | None  # the guest's own uptime, from its heartbeat
    heartbeat_age_s: float | None
    guest: GuestView = GuestView()
    accelerator: str | None
    started_at: float | None
    created_at: float
    state_since: float
    job: str | None
    last_error: str | None
    host_reachable: bool


class VMRecords:
    """The VM records in the store. The one way to read and change them:

    - :meth:`get` one record, :meth:`all` of them;
    - :meth:`update`: read-modify-write with compare-and-swap (the general form);
    - :meth:`set`: set some fields (and the state) whatever the record holds now;
    - :meth:`transition`: move to a state only if the record is still as it was seen.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    async def get(self, name: str) -> VMRecord:
        """The record of VM ``name``; NotFound if there is none."""
        validate_name(name)
        e = await self.store.get(vm_key(name))
        if e is None:
            raise NotFound(f"no VM named {name!r}")
        return VMRecord.model_validate(e.value)

    async def all(self) -> list[VMRecord]:
        """Every VM's record."""
        return [VMRecord.model_validate(e.value) for e in await self.store.range("vms/")]

    async def update(self, name: str, fn: Callable[[VMRecord], VMRecord | None]) -> VMRecord | None:
        """Read-modify-write a record with compare-and-swap; ``fn`` may raise to refuse, or return
        None (or the record unchanged) to leave it as it is. Returns the record as written (or as found)."""
        for _ in range(20):
            e = await self.store.get(vm_key(name))
            if e is None:
                raise NotFound(f"no VM named {name!r}")
            rec = VMRecord.model_validate(e.value)
            new = fn(rec)
            if new is None or new == rec:
                return rec
            try:
                await self.store.put(vm_key(name), new.model_dump(mode="json"), expect_rev=e.mod_rev)
                return new
            except StoreConflict:
                await asyncio.sleep(0.01)
        raise StoreConflict(f"the record of VM {name!r} keeps changing; try again")

    async def set(self, name: str, **changes: Any) -> VMRecord:
        """Set fields of a record (``state=`` moves it, with a new ``state_since``), whatever it holds now."""

        def apply(r: VMRecord) -> VMRecord:
            state = changes.pop("state", r.state)
            return r.with_state(state, **changes)

        rec = await self.update(name, apply)
        assert rec is not None
        return rec

    async def transition(self, seen: VMRecord, state: VMState, **changes: Any) -> bool:
        """Move a record to ``state`` only if nobody changed it since ``seen`` (no double ledger entries)."""
        done = False

        def apply(r: VMRecord) -> VMRecord | None:
            nonlocal done
            # The runtime report was read for ``seen``: if the VM changed since (a job ran,
            # it moved to another host, it restarted), that report says nothing about it now.
            if (r.state, r.host, r.started_at, r.job) != (seen.state, seen.host, seen.started_at, None):
                return None
            done = True
            return r.with_state(state, **changes)

        await self.update(seen.name, apply)
        return done


class VMJobRunner:
    """Jobs that work on one VM: :meth:`claim` the VM (its record names the job, so two operations
    never run on one VM at once), :meth:`submit` the job, which :meth:`release`\\ s the VM when it ends."""

    def __init__(self, records: VMRecords, jobs: Jobs) -> None:
        self.records = records
        self.jobs = jobs

    async def claim(self, name: str, action: Action, job_id: str) -> VMRecord:
        """Mark VM ``name`` as held by job ``job_id``; WrongState if a job holds it or ``action`` does
        not apply to its state."""

        def apply(r: VMRecord) -> VMRecord:
            if r.job is not None:
                raise WrongState(f"VM {name!r} is busy with job {r.job}; try again when it ends", job=r.job)
            check_action(name, action, r.state)
            return r.model_copy(update={"job": job_id})

        rec = await self.records.update(name, apply)
        assert rec is not None
        return rec

    async def release(self, job: JobRecord) -> None:
        """Free the VM that ``job`` held (keeping its error as the VM's last error); nothing if it holds none."""

        def apply(r: VMRecord) -> VMRecord | None:
            if r.job != job.id:
                return None
            err = job.error["message"] if job.error else None
            return r.model_copy(update={"job": None, "last_error": err})

        if job.vm is not None:
            with contextlib.suppress(NotFound):
                await self.records.update(job.vm, apply)

    async def submit(self, kind: str, name: str, fn: Callable[[JobContext], Any], job_id: str) -> JobRecord:
        """Run ``fn`` as job ``job_id`` on VM ``name``, releasing the VM when it ends."""
        return await self.jobs.submit(kind, name, fn, on_done=self.release, job_id=job_id)


class VMControl(Protocol):
    """What the VM sub-services use of :class:`kasou.control.vms.VMService`, which builds them.

    A sub-service that also needs another sub-service extends this protocol with that attribute."""

    store: Any
    agents: Agents
    jobs: Jobs
    ledger: Ledger
    events: Events
    networks: Networks
    vcpu_ratio: float
    records: VMRecords
    runner: VMJobRunner

    async def get(self, name: str) -> VMView: ...

    async def list_all(self) -> list[VMView]: ...

    def view(
        self, rec: VMRecord, rt: RuntimeInfo | None, reachable: bool, maintenance: set[str] | None = None
    ) -> VMView: ...

    async def create(self, spec: VMCreate, scope: Collection[str] | None = None) -> tuple[VMView, JobRecord]: ...

    async def action(self, name: str, action: Action, timeout: float | None = None) -> JobRecord: ...

    async def delete(self, name: str, keep_disks: bool = False, force: bool = False) -> JobRecord: ...

    async def check_name_free(self, name: str, department: str | None, scope: Collection[str] | None) -> None: ...

    async def check_group(self, group: str | None, department: str | None, scope: Collection[str] | None) -> None: ...

    @staticmethod
    def new_job_id() -> str: ...

    async def host_loads(self, exclude: str | None = None) -> list[scheduler.HostLoad]: ...

    async def check_fits_some_host(self, vcpus: int, memory_mib: int) -> list[scheduler.HostLoad]: ...

    async def admit(self, rec: VMRecord, ha_check: bool = True) -> None: ...

    def launch_spec(self, rec: VMRecord) -> LaunchSpec: ...

    async def start_now(
        self, rec: VMRecord, event: LedgerEvent = LedgerEvent.STARTED, detail: str = "", admit_ha: bool = True
    ) -> None: ...

    async def stopped(self, rec: VMRecord, detail: str) -> None: ...

    async def undo_create(self, name: str, host: str | None, disk_paths: list[str]) -> None: ...
