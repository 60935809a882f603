"""A driver with no hypervisor behind it, for fast functional tests of everything above.

It keeps the same contract as the QEMU driver (states, errors, never two copies
of one VM), checked by the contract tests that run against both
(``tests/contract/test_driver_contract.py``), and lets a test make a VM crash or a start fail.

Live migration works between fake drivers of one process (one per fake host):
``prepare_incoming`` registers the destination under its migration URI, the
source finds it there. A migration answers ``migration_polls`` status calls with
``mirroring``/``active`` and then ``completed``; ``fail_next_migration`` makes the
next one fail. With copy storage the destination's disk files are really made
(``qemu-img create``) and removed again by an abort.

Disk replication works the same way: :class:`FakeExports` (the replica side,
``replica_exports()``) registers each served replica file in the process, and
``attach_replica`` finds it there. A replica is ``in_sync`` at once (or after
``replica_sync_polls`` status calls saying ``syncing``); it turns ``degraded``
when its export goes away (deleted, promoted, ``FakeExports.kill``) or when a
test calls ``degrade_replica``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from kasou.errors import (
    AlreadyExists,
    Conflict,
    HypervisorError,
    InvalidSpec,
    NotFound,
    QemuStartError,
    WrongState,
)
from kasou.hypervisor import imagefiles
from kasou.hypervisor.backups import BackupDisk, BackupDiskResult
from kasou.hypervisor.base import (
    Driver,
    GuestExec,
    GuestInfo,
    IncomingInfo,
    LaunchDisk,
    LaunchSpec,
    MigrationStatus,
    MigrationStorage,
    MirrorStatus,
    ReplicaExports,
    ReplicaStatus,
    RuntimeInfo,
    RuntimeState,
    validate_disk_id,
)
from kasou.hypervisor.snapshots import (
    SnapshotLayers,
    SnapshotMerge,
    SnapshotMerged,
    SnapshotTake,
    SnapshotTaken,
    allocated,
    commit_offline,
    create_overlay,
    memory_path,
    overlay_path,
)
from kasou.hypervisor.stats import DiskIO, NicIO, VmStats
from kasou.model.firmware import VARS_ID
from tests.doubles.devices import FakeDevices
from tests.doubles.exports import FakeExports

_GUEST = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN)
_ACTIVE = (*_GUEST, RuntimeState.INCOMING)


@dataclass
class _Out:
    incoming: IncomingInfo
    was_running: bool
    polls_left: int
    status: str
    error: str | None = None
    reported_completed: bool = False


@dataclass
class _In:
    info: IncomingInfo
    created: list[str]
    arrived: RuntimeInfo | None = None  # the source's view when the migration completed


@dataclass
class _Replica:
    host: str
    port: int
    export: str
    since: float = field(default_factory=time.time)
    polls_left: int = 0
    error: str | None = None


class FakeDriver(FakeDevices, Driver):
    #: Destinations waiting in this process: migration URI -> (driver, VM name).
    _listening: ClassVar[dict[str, tuple[FakeDriver, str]]] = {}
    _next_port: ClassVar[int] = 49152

    def __init__(self, accelerator: str = "tcg") -> None:
        self.accelerator = accelerator
        self.vms: dict[str, RuntimeInfo] = {}
        self.specs: dict[str, LaunchSpec] = {}
        self.logs: dict[str, str] = {}  # VM name -> the uuid of the VM whose serial log this host keeps
        self.fail_next_start: str | None = None  # the message of a start that should fail
        self.powerdown_exits = True  # a guest that honours the ACPI power button
        self.migration_polls = 1  # status calls answered "mirroring"/"active" before "completed"
        self.fail_next_migration: str | None = None  # the error of the next migration from here
        self.outgoing: dict[str, _Out] = {}
        self.incoming: dict[str, _In] = {}
        self._next_pid = 1000
        self.replica_sync_polls = 0  # status calls answered "syncing" before "in_sync"
        self.replicas: dict[str, dict[str, _Replica]] = {}  # VM -> disk id -> attached replica
        self.mirrors: dict[str, dict[str, MirrorStatus]] = {}  # VM -> disk id -> its mirror
        self.mirror_syncs: list[tuple[str, str, str]] = []  # (VM, disk, sync) of every mirror attached
        self._exports = FakeExports()
        self.fail_next_snapshot: str | None = None  # the error of the next live snapshot
        self.fail_next_backup: str | None = None  # the error of the next backup of a running VM
        self.bitmaps: dict[str, dict[str, str]] = {}  # VM -> disk id -> the backup bitmap it keeps
        self.agent_shutdown_exits = True  # a guest whose agent carries out guest-shutdown
        self.agent_shutdowns: list[str] = []  # VMs asked to shut down through their guest agent
        # guest_exec: program -> (exit code, stdout, stderr) as the guest would answer; runs asked, in order
        self.guest_programs: dict[str, tuple[int, str, str]] = {"/bin/true": (0, "", "")}
        self.guest_runs: list[tuple[str, list[str]]] = []
        self.agents_answer = False  # every guest started from now on has its guest agent answering
        self.freezes: list[str] = []  # VMs whose file systems were frozen for a snapshot or backup

    def set_guest_agent(self, name: str, answering: bool = True, heartbeat: bool = True, **guest: object) -> None:
        """Test hook: the guest's agent answers (or stops answering); ``heartbeat=False``: a guest without
        kasou's heartbeat (a real OS), whose readiness is then its agent's."""
        info = self.vms[name]
        seen = answering or info.guest.agent_age_s is not None
        g = info.guest.model_copy(update={"agent": answering, "agent_age_s": (0.0 if answering else
                                          (info.guest.agent_age_s or 0.0)) if seen else None, **guest})  # fmt: skip
        extra: dict[str, object] = {"guest": g}
        if not heartbeat:
            extra.update(guest_ready=answering, guest_uptime_s=None, heartbeat_age_s=None)
        self.vms[name] = info.model_copy(update=extra)

    def _consistency(self, name: str) -> Literal["application", "crash"]:
        info = self.vms[name]
        if info.state == RuntimeState.RUNNING and info.guest.agent:
            self.freezes.append(name)
            return "application"
        return "crash"

    def crash(self, name: str) -> None:
        """Test hook: the VM's process dies by itself."""
        self._set(name, RuntimeState.CRASHED, pid=None, exit_reason="killed")

    async def attach_all(self) -> list[str]:
        """As QEMU's after an agent restart: the VMs found anew. A fake host keeps its VMs in memory: none."""
        return []

    async def start(self, spec: LaunchSpec) -> RuntimeInfo:
        cur = self.vms.get(spec.name)
        if cur is not None and cur.state in _ACTIVE:
            raise Conflict(f"VM {spec.name!r} already runs on this host (pid {cur.pid})")
        if self.fail_next_start is not None:
            msg, self.fail_next_start = self.fail_next_start, None
            raise QemuStartError(f"QEMU refused to start VM {spec.name!r}: {msg}")
        _check_disks(spec)
        self._next_pid += 1
        # A VM started paused has not run a single instruction: its guest is not ready (as QEMU's -S).
        booted = not spec.paused
        info = RuntimeInfo(
            name=spec.name,
            state=RuntimeState.PAUSED if spec.paused else RuntimeState.RUNNING,
            pid=self._next_pid,
            started_at=time.time(),
            accelerator=self.accelerator,
            guest_ready=booted,
            guest_uptime_s=0.0 if booted else None,
            heartbeat_age_s=0.0 if booted else None,
            guest=GuestInfo(agent=True, agent_age_s=0.0) if booted and self.agents_answer else GuestInfo(),
        )
        self.vms[spec.name] = info
        self.specs[spec.name] = spec
        self.logs[spec.name] = spec.uuid  # like QEMU, a new process starts its log afresh
        self.replicas.pop(spec.name, None)  # a new process mirrors nothing
        self.mirrors[spec.name] = {}
        for d in spec.disks:
            if d.mirror:
                ok = Path(d.mirror).exists()
                self.mirror_syncs.append((spec.name, d.id, d.mirror_sync))
                self.mirrors[spec.name][d.id] = MirrorStatus(
                    disk_id=d.id, state="in_sync" if ok else "degraded", progress=1.0 if ok else 0.0, path=d.path,
                    second=d.mirror if ok else None, failed=None if ok else d.mirror, since=time.time(),
                    error=None if ok else f"the second copy {d.mirror} could not be opened",
                )  # fmt: skip
        return info

    def _active(self, name: str) -> RuntimeInfo:
        info = self.vms.get(name)
        if info is None or info.state not in _ACTIVE:
            raise NotFound(f"VM {name!r} is not running on this host")
        if info.state == RuntimeState.INCOMING:
            raise WrongState(f"VM {name!r} is arriving by migration on this host; it does not run here yet")
        if name in self.outgoing:
            raise WrongState(f"VM {name!r} is migrating to another host; finish or abort that first")
        return info

    def _set(self, name: str, state: RuntimeState, **extra: object) -> None:
        if state not in _GUEST:  # as QEMU's: no guest runs (any more, or yet) in this process
            extra.setdefault("guest_ready", False)
            extra.setdefault("guest", GuestInfo())
        self.vms[name] = self.vms[name].model_copy(update={"state": state, **extra})

    async def powerdown(self, name: str) -> None:
        self._active(name)
        if self.powerdown_exits:
            self._set(name, RuntimeState.EXITED, pid=None, exit_reason="guest-shutdown")
        else:
            self._set(name, RuntimeState.SHUTTING_DOWN)

    async def guest_shutdown(self, name: str) -> None:
        info = self._active(name)
        if not info.guest.agent or info.state != RuntimeState.RUNNING:
            raise WrongState(f"VM {name!r} has no guest agent answering; press its power button instead")
        self.agent_shutdowns.append(name)
        if self.agent_shutdown_exits:
            self._set(name, RuntimeState.EXITED, pid=None, exit_reason="guest-shutdown")
        else:
            self._set(name, RuntimeState.SHUTTING_DOWN)

    async def guest_exec(self, name: str, argv: list[str], timeout_s: float) -> GuestExec:
        info = self._active(name)
        if not info.guest.agent or info.state != RuntimeState.RUNNING:
            raise WrongState(f"VM {name!r} has no guest agent answering: nothing can run in it")
        self.guest_runs.append((name, list(argv)))
        code, out, err = self.guest_programs.get(argv[0], (127, "", f"{argv[0]}: not found"))
        return GuestExec(exitcode=code, stdout=out, stderr=err, seconds=0.0)

    async def stop(self, name: str) -> None:
        if name not in self.vms:
            raise NotFound(f"VM {name!r} is not running on this host")
        if self.vms[name].state in _ACTIVE:
            self._set(name, RuntimeState.EXITED, pid=None, exit_reason="stopped")

    async def reset(self, name: str) -> None:
        """The machine resets; a paused VM stays paused (QEMU's ``system_reset`` leaves the vCPUs as they are)."""
        info = self._active(name)
        self._set(name, info.state, guest_uptime_s=0.0, guest=GuestInfo())  # it must answer again to count

    async def pause(self, name: str) -> None:
        self._active(name)
        self._set(name, RuntimeState.PAUSED)

    async def resume(self, name: str) -> None:
        info = self._active(name)
        if info.guest_ready:
            self._set(name, RuntimeState.RUNNING)
        else:  # started paused: the guest boots now (at once, for a fake)
            self._set(name, RuntimeState.RUNNING, guest_ready=True, guest_uptime_s=0.0, heartbeat_age_s=0.0)

    async def info(self, name: str) -> RuntimeInfo | None:
        return self.vms.get(name)

    async def list(self) -> list[RuntimeInfo]:
        return [self.vms[n] for n in sorted(self.vms)]

    async def forget(self, name: str) -> None:
        info = self.vms.get(name)
        if info is not None and info.state in _ACTIVE:
            raise Conflict(f"VM {name!r} still runs; stop it first")
        self.vms.pop(name, None)
        self.specs.pop(name, None)

    async def console_log(self, name: str, max_bytes: int = 65536, uuid: str | None = None) -> str:
        # Like QEMU's log file, the log outlives the process and ``forget``.
        if name not in self.logs or (uuid is not None and self.logs[name] != uuid):
            raise NotFound(f"VM {name!r} has no console output on this host")
        return f"KASOU-READY\nfake console of {name}\n"[-max_bytes:]

    # -- live migration ----------------------------------------------------------------

    async def prepare_incoming(self, spec: LaunchSpec, storage: MigrationStorage, listen_host: str) -> IncomingInfo:
        cur = self.vms.get(spec.name)
        if cur is not None and cur.state in _ACTIVE:
            raise Conflict(f"VM {spec.name!r} already runs on this host (pid {cur.pid})")
        created: list[str] = []
        if storage == "copy":
            for d in spec.disks:
                if d.readonly:
                    raise InvalidSpec(f"read-only disk {d.id} cannot be copied; use shared storage")
                if d.size_bytes is None:
                    raise InvalidSpec(f"disk {d.id} needs size_bytes to be copied", field="disks")
                if Path(d.path).exists():
                    raise AlreadyExists(f"disk {d.path} already exists on this host")
            if spec.nvram is not None and Path(spec.nvram).exists():
                raise AlreadyExists(f"{spec.nvram} already exists on this host")
            for d in spec.disks:
                created.append(d.path)
                _make_disk(Path(d.path), d.format, d.size_bytes or 0)
            if spec.nvram is not None:  # as QEMU's driver: a copy of OVMF's template, filled by the mirror
                created.append(spec.nvram)
                Path(spec.nvram).write_bytes(b"\0" * 4096)
        else:
            _check_disks(spec.model_copy(update={"tpm_state": None}))  # the waiting QEMU opens the shared disks
        if spec.tpm_state is not None:  # the TPM's state always arrives in a new directory
            if Path(spec.tpm_state).exists():
                raise AlreadyExists(f"{spec.tpm_state} already exists on this host")
            created.append(spec.tpm_state)
            Path(spec.tpm_state).mkdir(parents=True)
        FakeDriver._next_port += 2
        port = FakeDriver._next_port
        info = IncomingInfo(
            storage=storage,
            migration_uri=f"tcp:{listen_host}:{port}",
            nbd_host=listen_host if storage == "copy" else None,
            nbd_port=port + 1 if storage == "copy" else None,
            exports={d.id: d.id for d in spec.disks} if storage == "copy" else {},
        )
        self._next_pid += 1
        self.vms[spec.name] = RuntimeInfo(
            name=spec.name,
            state=RuntimeState.INCOMING,
            pid=self._next_pid,
            started_at=time.time(),
            accelerator=self.accelerator,
        )
        self.specs[spec.name] = spec
        self.logs[spec.name] = spec.uuid
        self.incoming[spec.name] = _In(info, created)
        FakeDriver._listening[info.migration_uri] = (self, spec.name)
        return info

    async def migrate_out(
        self,
        name: str,
        incoming: IncomingInfo,
        downtime_ms: int = 100,
        auto_converge: bool = True,
        bandwidth_mib_s: int | None = None,
    ) -> None:
        info = self._active(name)
        if self.replicas.get(name):
            raise Conflict(f"VM {name!r} has a disk replica attached; detach it before migrating")
        if any(m.second for m in self.mirrors.get(name, {}).values()):  # as QEMU: a disk's node is busy
            raise Conflict(f"VM {name!r} has a mirrored disk's second copy attached; detach it before migrating")
        if incoming.migration_uri not in FakeDriver._listening:
            raise HypervisorError(f"cannot connect to {incoming.migration_uri}: nobody waits there")
        status = "mirroring" if incoming.storage == "copy" else "active"
        was_running = info.state == RuntimeState.RUNNING
        self.outgoing[name] = _Out(incoming, was_running, self.migration_polls, status)

    async def migration_status(self, name: str) -> MigrationStatus:
        info = self.vms.get(name)
        if info is None or info.state not in _ACTIVE:
            raise NotFound(f"VM {name!r} is not running on this host")
        out = self.outgoing.get(name)
        if out is None:
            return MigrationStatus(status="none")
        dest = FakeDriver._listening.get(out.incoming.migration_uri)
        if out.status in ("mirroring", "active"):
            if self.fail_next_migration is not None:
                out.status, out.error, self.fail_next_migration = "failed", self.fail_next_migration, None
                if dest is not None:  # a destination QEMU exits when its incoming migration breaks
                    dest[0]._set(dest[1], RuntimeState.CRASHED, pid=None, exit_reason="incoming migration failed")
            elif out.polls_left > 0:
                out.polls_left -= 1
                if out.status == "mirroring" and out.polls_left < self.migration_polls / 2:
                    out.status = "active"
            else:
                out.status = "completed"
                self._set(name, RuntimeState.PAUSED)
                if dest is not None:
                    dest[0].incoming[dest[1]].arrived = self.vms[name]
        if out.status == "completed":
            out.reported_completed = True
            return MigrationStatus(status="completed", progress=1.0, downtime_ms=1, total_ms=50, setup_ms=1)
        if out.status == "failed":
            return MigrationStatus(status="failed", error=out.error)
        progress = 0.25 if out.status == "mirroring" else 0.5
        return MigrationStatus(status=out.status, progress=progress, total_ms=20, setup_ms=1)

    async def finish_incoming(self, name: str) -> RuntimeInfo:
        info = self.vms.get(name)
        arriving = self.incoming.get(name)
        if info is not None and info.state in _GUEST and arriving is None:
            return info
        if info is None or info.state != RuntimeState.INCOMING or arriving is None:
            raise NotFound(f"VM {name!r} is not arriving on this host")
        if arriving.arrived is None:
            raise WrongState(f"the incoming migration of VM {name!r} is not complete here")
        FakeDriver._listening.pop(arriving.info.migration_uri, None)
        del self.incoming[name]
        self._set(
            name,
            RuntimeState.RUNNING,
            guest_ready=True,
            guest_uptime_s=arriving.arrived.guest_uptime_s,
            heartbeat_age_s=0.0,
        )
        return self.vms[name]

    async def finish_out(self, name: str) -> None:
        if name not in self.vms:
            return
        out = self.outgoing.get(name)
        if out is None or out.status != "completed":
            raise WrongState(f"VM {name!r} has no completed migration to finish here")
        del self.outgoing[name]
        self.vms.pop(name, None)
        self.specs.pop(name, None)

    async def abort_out(self, name: str, force: bool = False) -> None:
        info = self.vms.get(name)
        if info is None or info.state not in _GUEST:
            raise NotFound(f"VM {name!r} is not running on this host")
        out = self.outgoing.get(name)
        if out is None:
            return
        if out.reported_completed and not force:
            raise WrongState(
                f"the migration of VM {name!r} completed and the destination may run it; "
                "abort there first, then abort here with force"
            )
        dest = FakeDriver._listening.get(out.incoming.migration_uri)
        if dest is not None and out.status in ("active", "completed"):
            with contextlib.suppress(KeyError):  # its QEMU exits when the stream breaks
                dest[0]._set(dest[1], RuntimeState.CRASHED, pid=None, exit_reason="incoming migration failed")
        del self.outgoing[name]
        if out.was_running:
            self._set(name, RuntimeState.RUNNING)

    async def abort_incoming(self, name: str) -> None:
        info = self.vms.get(name)
        if info is None:
            return
        arriving = self.incoming.get(name)
        if info.state in _GUEST or arriving is None:
            raise WrongState(f"VM {name!r} is not arriving on this host; there is no migration to abort")
        FakeDriver._listening.pop(arriving.info.migration_uri, None)
        for path in arriving.created:
            if Path(path).is_dir():
                shutil.rmtree(path)
            Path(path).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(path).parent.rmdir()
        del self.incoming[name]
        self.vms.pop(name, None)
        self.specs.pop(name, None)
        self.logs.pop(name, None)  # QEMU's driver removes the log of an aborted arrival

    # -- disk replication ----------------------------------------------------------------

    def degrade_replica(self, name: str, disk_id: str, error: str = "the replica stopped answering") -> None:
        """Test hook: the replica of a disk is lost (its host died, say); the VM goes on running."""
        self.replicas[name][disk_id].error = error

    async def attach_replica(
        self, name: str, disk_id: str, nbd_host: str, nbd_port: int, export: str, timeout_s: float = 60.0
    ) -> ReplicaStatus:
        self._active(name)
        validate_disk_id(disk_id)
        disk = next((d for d in self.specs[name].disks if d.id == disk_id), None)
        if disk is None:
            raise InvalidSpec(f"the VM has no disk {disk_id!r}", field="disk_id")
        if disk.readonly:
            raise InvalidSpec(f"disk {disk_id} is read-only; there is nothing to replicate", field="disk_id")
        attached = self.replicas.setdefault(name, {})
        cur = attached.get(disk_id)
        if cur is not None and ((cur.host, cur.port, cur.export) != (nbd_host, nbd_port, export) or cur.error):
            raise Conflict(f"disk {disk_id} already has a replica at {cur.host}:{cur.port}; detach it first")
        if cur is None:
            if FakeExports.find(nbd_host, nbd_port, export) is None:
                raise HypervisorError(f"cannot reach the replica of disk {disk_id} at {nbd_host}:{nbd_port}")
            polls = 0 if timeout_s > 0 else self.replica_sync_polls
            attached[disk_id] = _Replica(nbd_host, nbd_port, export, polls_left=polls)
        return next(s for s in await self.replica_status(name) if s.disk_id == disk_id)

    async def replica_status(self, name: str) -> builtins.list[ReplicaStatus]:
        info = self.vms.get(name)
        if info is None or info.state not in _GUEST:
            raise NotFound(f"VM {name!r} is not running on this host")
        attached = self.replicas.get(name, {})
        ids = [d.id for d in self.specs[name].disks]
        out = []
        for d in ids + sorted(set(attached) - set(ids)):
            r = attached.get(d)
            if r is None:
                out.append(ReplicaStatus(disk_id=d, state="none"))
                continue
            if r.error is None and FakeExports.find(r.host, r.port, r.export) is None:
                r.error = "a write to the replica failed: Input/output error"
            st = ReplicaStatus(
                disk_id=d, state="in_sync", progress=1.0, nbd_host=r.host, nbd_port=r.port, export=r.export
            )
            st.since = r.since
            if r.error is not None:
                st = st.model_copy(update={"state": "degraded", "progress": 0.0, "error": r.error})
            elif r.polls_left > 0:
                r.polls_left -= 1
                st = st.model_copy(update={"state": "syncing", "progress": 0.5})
            out.append(st)
        return out

    async def detach_replica(self, name: str, disk_id: str) -> None:
        self.replicas.get(name, {}).pop(disk_id, None)

    # -- backups: real qemu-img files; the dirty bitmaps are names kept in memory -----------

    async def backup_disks(
        self, name: str, backup_id: str, disks: builtins.list[BackupDisk], timeout_s: float = 1800.0
    ) -> builtins.list[BackupDiskResult]:
        """Copies the disk files as a stopped VM's backup does (an incremental by content against its backing)."""
        self._active(name)
        spec = self.specs[name]
        if self.fail_next_backup is not None:
            msg, self.fail_next_backup = self.fail_next_backup, None
            raise HypervisorError(f"the backup failed: {msg}")
        held = self.bitmaps.setdefault(name, {})
        consistency = self._consistency(name)
        out: builtins.list[BackupDiskResult] = []
        done: builtins.list[Path] = []
        try:
            for d in disks:
                if d.disk_id == VARS_ID and spec.nvram is not None:  # the UEFI variables: a raw node, always full
                    src = LaunchDisk(id=VARS_ID, path=spec.nvram, format="raw")
                else:
                    src = next(x for x in spec.disks if x.id == d.disk_id)
                incremental = d.backing is not None and d.base_bitmap is not None and src.format == "qcow2"
                persistent = await imagefiles.bitmaps(src.path) if incremental else []
                incremental = incremental and (held.get(d.disk_id) == d.base_bitmap or d.base_bitmap in persistent)
                target = Path(d.target)
                done.append(target)
                if incremental:
                    assert d.backing is not None
                    await imagefiles.offline_incremental(src.path, src.format, target, Path(d.backing).name)
                else:
                    await imagefiles.convert(src.path, target, src.format)
                note = "" if incremental or d.backing is None else "full backup instead of incremental: no dirty bitmap"
                out.append(
                    BackupDiskResult(
                        disk_id=d.disk_id, kind="incremental" if incremental else "full", target=d.target,
                        backing=d.backing if incremental else None,
                        bitmap=d.new_bitmap if src.format == "qcow2" else None,
                        bytes_copied=Path(d.target).stat().st_size, note=note, consistency=consistency,
                    )
                )  # fmt: skip
        except BaseException:
            for t in done:
                t.unlink(missing_ok=True)
            raise
        for d in disks:
            if d.disk_id != VARS_ID:
                held[d.disk_id] = d.new_bitmap
        return out

    def drop_bitmaps(self, name: str) -> None:
        """Test hook: the VM's dirty bitmaps are gone (its disk was replaced)."""
        self.bitmaps.pop(name, None)

    def replica_exports(self) -> ReplicaExports:
        return self._exports

    # -- mirrored disks: states only (the copies are the files the disk API made) ---------------

    def fail_mirror_copy(self, name: str, disk_id: str, which: str = "second", why: str = "I/O error") -> None:
        """Test hook: one copy of a mirrored disk fails; the first one makes the disk switch to the second."""
        st = self.mirrors[name][disk_id]
        if which == "second":
            self.mirrors[name][disk_id] = st.model_copy(
                update={"state": "degraded", "second": None, "failed": st.second, "error": why}
            )
        else:
            self.mirrors[name][disk_id] = st.model_copy(
                update={"state": "degraded", "path": st.second, "second": None, "failed": st.path, "error": why}
            )

    async def attach_mirror(self, name: str, disk_id: str, target: str, sync: str = "full") -> MirrorStatus:
        self._active(name)
        validate_disk_id(disk_id)
        disk = next((d for d in self.specs[name].disks if d.id == disk_id), None)
        if disk is None:
            raise InvalidSpec(f"the VM has no disk {disk_id!r}", field="disk_id")
        cur = self.mirrors.setdefault(name, {}).get(disk_id)
        if cur is not None and cur.state != "degraded" and cur.second not in (None, target):
            raise Conflict(f"disk {disk_id} is mirrored to {cur.second} already; detach that copy first")
        if not Path(target).exists():
            raise InvalidSpec(f"the second copy {target} does not exist", field="mirror")
        path = cur.path if cur is not None else disk.path
        st = MirrorStatus(disk_id=disk_id, state="in_sync", progress=1.0, path=path, second=target, since=time.time())
        self.mirrors[name][disk_id] = st
        self.mirror_syncs.append((name, disk_id, sync))
        return st

    async def mirror_status(self, name: str) -> builtins.list[MirrorStatus]:
        self._active(name)
        known = self.mirrors.get(name, {})
        return [known.get(d.id) or MirrorStatus(disk_id=d.id, state="none") for d in self.specs[name].disks]

    async def detach_mirror(self, name: str, disk_id: str) -> None:
        self.mirrors.get(name, {}).pop(disk_id, None)

    # -- snapshots: real overlay files (qemu-img), the "memory" a small JSON file ----------------

    async def snapshot(self, name: str, req: SnapshotTake) -> SnapshotTaken:
        info = self._active(name)
        if req.memory and info.state != RuntimeState.RUNNING:
            raise WrongState(f"VM {name!r} is not running; a memory snapshot needs a running guest (resume it first)")
        if self.fail_next_snapshot is not None:
            msg, self.fail_next_snapshot = self.fail_next_snapshot, None
            raise HypervisorError(f"QEMU refused the snapshot of VM {name!r}: {msg}")
        layers = []
        for d in req.disks:
            ov = overlay_path(d.path, d.id, req.snapshot)
            await create_overlay(d.path, ov)
            layers.append(SnapshotLayers(id=d.id, base=d.path, overlay=str(ov)))
        state = memory_path(req.disks[0].path, req.snapshot) if req.memory and req.disks else None
        if state is not None:
            state.write_text(json.dumps({"guest_uptime_s": info.guest_uptime_s}))
        paths = {x.id: x.overlay for x in layers}
        spec = self.specs[name]
        spec.disks = [dk.model_copy(update={"path": paths.get(dk.id, dk.path)}) for dk in spec.disks]
        mem = state.stat().st_size if state is not None else 0
        return SnapshotTaken(
            snapshot=req.snapshot, disks=layers, memory_path=str(state) if state else None, memory_bytes=mem,
            size_bytes=mem, live=True, paused_ms=1 if state else 0,
            consistency="memory" if state else self._consistency(name),
        )  # fmt: skip

    async def merge_snapshot(self, name: str, req: SnapshotMerge) -> SnapshotMerged:
        self._active(name)
        spec = self.specs[name]
        active = {dk.id: dk.path for dk in spec.disks}
        for d in req.disks:
            await commit_offline(d.top, d.base, d.child)
            if active.get(d.id) == d.top:
                active[d.id] = d.base
        spec.disks = [dk.model_copy(update={"path": active[dk.id]}) for dk in spec.disks]
        return SnapshotMerged(disks=active, live=True, base_bytes={d.id: await allocated(d.base) for d in req.disks})

    async def restore(self, spec: LaunchSpec, state_path: str) -> RuntimeInfo:
        saved = json.loads(Path(state_path).read_text())
        info = await self.start(spec)
        self._set(spec.name, info.state, guest_uptime_s=saved.get("guest_uptime_s"))
        return self.vms[spec.name]

    async def stats(self) -> builtins.list[VmStats]:
        """Plausible figures that grow with the time each VM has run (a few % CPU, 60 % of memory resident)."""
        now, out = time.time(), []
        for name in sorted(self.vms):
            info, spec = self.vms[name], self.specs.get(name)
            if info.state not in _GUEST or spec is None:
                continue
            t = max(0.0, now - (info.started_at or now))
            disks = [
                DiskIO(id=d.id, read_bytes=int(t * 40_000), write_bytes=int(t * 10_000), read_ops=int(t * 10),
                       write_ops=int(t * 3))
                for d in spec.disks
            ]  # fmt: skip
            nics = [
                NicIO(id=n.id, device=None, counted=False)
                if n.network == "user"
                else NicIO(id=n.id, device=f"kt-{name[:6]}{n.id}", rx_bytes=int(t * 2_000), tx_bytes=int(t * 5_000),
                           rx_packets=int(t * 20), tx_packets=int(t * 40))
                for n in spec.nics
            ]  # fmt: skip
            rss = spec.memory_mib * 1024 * 1024 * 6 // 10
            cpu = round(t * 0.05 * spec.vcpus, 3)
            out.append(VmStats(name=name, state=info.state.value, taken_at=now, cpu_seconds=cpu, rss_bytes=rss,
                               disks=disks, nics=nics))  # fmt: skip
        return out

    # -- the CD drive ---------------------------------------------------------------------

    async def change_medium(self, name: str, iso: str | None) -> None:
        """As QEMU's: only a running VM with a drive; the disc is recorded in its launch spec (no image store
        here: the control plane has checked the image with the host's agent)."""
        self._active(name)
        spec = self.specs[name]
        if not spec.cdrom_drive:
            raise WrongState(f"VM {name!r} has no CD drive (a VM gets one when it is created with --cdrom ISO)")
        self.specs[name] = spec.model_copy(update={"cdrom": iso})

    # -- the display: a tiny RFB server per running VM (tests.doubles.rfb) --------------

    async def vnc_socket(self, name: str) -> Path | None:
        import tempfile

        from tests.doubles.rfb import FakeRfbServer

        rfb: dict[str, FakeRfbServer] = self.__dict__.setdefault("rfb", {})
        info = self.vms.get(name)
        if info is None or info.state not in _GUEST:
            return None
        if name not in rfb:
            if "_rfb_dir" not in self.__dict__:
                self._rfb_dir = Path(tempfile.mkdtemp(prefix="kasou-fake-vnc-"))
            rfb[name] = FakeRfbServer(self._rfb_dir / f"{name}.sock", name)
            await rfb[name].start()
        return rfb[name].path

    async def serial_socket(self, name: str) -> Path | None:
        """A serial console that answers each line typed with ``echo: <line>``."""
        import tempfile

        servers: dict[str, asyncio.base_events.Server] = self.__dict__.setdefault("serial", {})
        info = self.vms.get(name)
        if info is None or info.state not in _GUEST:
            return None
        if "_rfb_dir" not in self.__dict__:
            self._rfb_dir = Path(tempfile.mkdtemp(prefix="kasou-fake-vnc-"))
        path = self._rfb_dir / f"{name}.serial"
        if name not in servers:

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(f"{name} login: ".encode())
                with contextlib.suppress(OSError, ConnectionError):
                    while line := await reader.readline():
                        writer.write(b"echo: " + line)
                        await writer.drain()
                writer.close()

            servers[name] = await asyncio.start_unix_server(serve, str(path))
        return path

    async def close(self) -> None:
        for server in self.__dict__.get("rfb", {}).values():
            await server.close()
        for srv in self.__dict__.get("serial", {}).values():
            srv.close()
        if "_rfb_dir" in self.__dict__:
            shutil.rmtree(self._rfb_dir, ignore_errors=True)


def _check_disks(spec: LaunchSpec) -> None:
    """QEMU opens every disk of a VM (and its UEFI variables) as it starts: one that is not there is a failed
    start, and so is a missing TPM state (the QEMU driver's swtpm refuses it)."""
    for path in [d.path for d in spec.disks] + ([spec.nvram] if spec.nvram is not None else []):
        if not Path(path).exists():
            raise QemuStartError(
                f"QEMU refused to start VM {spec.name!r}: Could not open '{path}': No such file or directory"
            )
    if spec.tpm_state is not None and not Path(spec.tpm_state).is_dir():
        raise QemuStartError(f"the TPM state of VM {spec.name!r} is missing: {spec.tpm_state}")


def _make_disk(path: Path, fmt: str, size_bytes: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("qemu-img") is None:
        path.write_bytes(b"")
        return
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), str(size_bytes)],
        check=True,
        capture_output=True,
        timeout=30,
    )
