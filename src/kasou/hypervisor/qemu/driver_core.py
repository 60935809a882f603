"""The QEMU driver's core: runs each VM as a ``qemu-system-x86_64`` process driven over QMP.

The agent spawns QEMU in a session of its own (see :mod:`kasou.hypervisor.qemu.spawn`),
so a VM never belongs to the agent's process group: killing the agent (even SIGKILL)
leaves every VM running. Each VM has a
runtime directory (sockets, pid file, the launch spec, an exit record); after
a restart :meth:`QemuDriver.attach_all` finds every QEMU again from those
files and checks the pid really is that guest's QEMU. A VM whose process is
gone without an exit record is reported as crashed.

This module has the lifecycle; the storage operations (replication, mirrors,
snapshots, backups) are in :mod:`kasou.hypervisor.qemu.driver_storage`, live
migration in :mod:`kasou.hypervisor.qemu.driver_migration`, and
:class:`kasou.hypervisor.qemu.driver.QemuDriver` puts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasou.config import ConfineSettings, confine_settings, ovmf_dir
from kasou.errors import (
    Conflict,
    KasouError,
    MonitorError,
    NotFound,
    QemuStartError,
    WrongState,
)
from kasou.hypervisor.base import (
    Driver,
    GuestInfo,
    LaunchSpec,
    RuntimeInfo,
    RuntimeState,
)
from kasou.hypervisor.qemu import confine as cf
from kasou.hypervisor.qemu import firmware as fw
from kasou.hypervisor.qemu import guest, media, mirrors, process, qga, seed, spawn, tpm
from kasou.hypervisor.qemu import migration as mig
from kasou.hypervisor.qemu import replication as repl
from kasou.hypervisor.qemu import runfiles as rf
from kasou.hypervisor.qemu import snapshots as snap
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.hypervisor.qemu.diskguard import DiskGuard
from kasou.hypervisor.qemu.monitor import Monitor
from kasou.hypervisor.qemu.network import HostNetwork, tap_nics

log = logging.getLogger(__name__)

START_TIMEOUT = spawn.START_TIMEOUT
QUIT_TIMEOUT = 10.0
HEARTBEAT_FRESH_S = 5.0
MONITOR_RETRY_MAX_S = 60.0  # a lost QMP monitor of a live QEMU is connected again, backing off up to this

GUEST_STATES = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN)  # the guest lives here
PROCESS_STATES = (*GUEST_STATES, RuntimeState.INCOMING)  # a QEMU process of the VM runs here
MIGRATED = "migrated"  # the exit reason of a source QEMU after a completed migration
STOPPED = "stopped"  # the exit reason of a QEMU ended by stop (the control plane tells it from a guest's power-off)


@dataclass
class QemuVm:
    name: str
    files: RuntimeFiles
    pid: int
    started_at: float | None
    accelerator: str | None
    state: RuntimeState = RuntimeState.RUNNING
    monitor: Monitor | None = None
    heartbeat_task: asyncio.Task[None] | None = None
    last_heartbeat: float | None = None  # monotonic
    guest_uptime: float | None = None
    guest_ready: bool = False
    exit_reason: str | None = None
    expect_exit: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    outgoing: mig.Outgoing | None = None  # this host sends the VM away
    incoming: mig.Incoming | None = None  # this host waits for the VM
    taps: list[str] = field(default_factory=list)  # ids of the NICs that have a tap here (not on "user")
    identity: cf.Identity | None = None  # the unprivileged user its QEMU runs as (None: unconfined)
    cgroup: cf.Cgroup | None = None
    agent: qga.GuestAgent | None = None  # the guest agent's channel (qga.sock), polled by agent_task
    agent_state: qga.AgentState = field(default_factory=qga.AgentState)
    agent_task: asyncio.Task[None] | None = None

    def guest_info(self) -> GuestInfo:
        a = self.agent_state
        live = self.state in GUEST_STATES
        age = None if a.last_answer is None or not live else round(time.monotonic() - a.last_answer, 2)
        return GuestInfo(agent=live and a.answering, agent_age_s=age, os=a.os, hostname=a.hostname, ips=a.ips)

    def info(self) -> RuntimeInfo:
        age = None if self.last_heartbeat is None else time.monotonic() - self.last_heartbeat
        uptime = self.guest_uptime
        if uptime is not None and age is not None and age < HEARTBEAT_FRESH_S and self.state in GUEST_STATES:
            uptime += age  # the guest's clock went on since its last line
        return RuntimeInfo(
            name=self.name,
            state=self.state,
            pid=self.pid if self.state in PROCESS_STATES else None,
            started_at=self.started_at,
            accelerator=self.accelerator,
            # kasou's heartbeat (its test guest, its Debian image), or else a guest agent that answers
            guest_ready=(self.guest_ready or self.agent_state.answering) and self.state in GUEST_STATES,
            guest_uptime_s=None if uptime is None else round(uptime, 2),
            heartbeat_age_s=None if age is None else round(age, 2),
            exit_reason=self.exit_reason,
            guest=self.guest_info(),
        )


class DriverCore(Driver):
    """Runs VMs as QEMU processes on this host (all but live migration)."""

    def __init__(
        self,
        run_dir: Path,
        serial_log_dir: Path,
        images_dir: Path,
        accelerator: str,
        qemu_binary: str = "qemu-system-x86_64",
        network: HostNetwork | None = None,
        tls_dir: Path | None = None,
        confine: ConfineSettings | None = None,
        ovmf: Path | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.ovmf_dir = ovmf or ovmf_dir()  # UEFI firmware images (Debian's ovmf)
        self.confine = confine if confine is not None else confine_settings()  # see confine.py
        self._cgroup_tag = cf.host_tag(run_dir)
        self._launching: set[str] = set()  # VMs whose QEMU is being started (their cgroup is new)
        # QEMU's credentials directory (kasou.hypervisor.qemu.tls.prepare): migration and NBD streams
        # between hosts are TLS with it; None (a host without TLS files) keeps them plain TCP.
        self.tls_dir = tls_dir
        self.network = network or HostNetwork()  # bridges and taps of NICs on named networks
        self.serial_log_dir = serial_log_dir
        self.images_dir = images_dir
        self.accelerator = accelerator
        self.qemu_binary = qemu_binary
        self._vms: dict[str, QemuVm] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._unplugging: set[asyncio.Task[None]] = set()
        self._replica_exports = repl.QsdExports(tls_dir=tls_dir)
        # watches replicas and mirrored disks of the VMs whose guest runs here (diskguard.py)
        self._disk_guard = DiskGuard(lambda: [vm for vm in self._vms.values() if vm.state in GUEST_STATES], self._exec)
        self._monitor_locks: dict[str, asyncio.Lock] = {}  # one (re)connection of a VM's monitor at a time
        self._monitor_retry: dict[str, tuple[float, float]] = {}  # VM -> (next attempt, back-off), monotonic
        self._reconnecting: set[str] = set()

    # -- files -----------------------------------------------------------------------

    def _files(self, name: str) -> RuntimeFiles:
        return RuntimeFiles(dir=self.run_dir / name, serial_log=self.serial_log_dir / f"{name}.log")

    @staticmethod
    def _log_owner(files: RuntimeFiles) -> str | None:
        """The uuid of the VM that wrote the serial log (for a log from before kasou marked it: the VM of
        the run directory, if there is one)."""
        try:
            return files.serial_owner.read_text().strip()
        except FileNotFoundError:
            launched = rf.launch_spec(files)
            return launched.uuid if launched is not None else None

    def _boot_files(self, image: str | None) -> BootFiles | None:
        if image is None:
            return None
        from kasou.image import load_image  # the image layer sits beside the driver

        art = load_image(self.images_dir, image)
        if art.kernel is None or art.initrd is None:
            return None  # the image's disk has its own boot loader: the firmware boots it
        if self.confine.enabled:  # a confined QEMU reads them as its own user: their directories must let it in
            for path in (art.kernel, art.initrd):
                cf.searchable(path)
        return BootFiles(kernel=art.kernel, initrd=art.initrd, kernel_args=art.kernel_args)

    def iso_file(self, image: str | None, vm: str | None = None) -> Path | None:
        """The file of the ISO image in VM ``vm``'s CD drive (None: the drive is empty or there is none)."""
        return media.iso_file(self.images_dir, image, vm)

    def _firmware_code(self, spec: LaunchSpec) -> Path | None:
        return fw.ovmf(spec.firmware, self.ovmf_dir).code if spec.nvram is not None else None

    @contextlib.asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            yield

    # -- lifecycle -------------------------------------------------------------------

    async def attach_all(self) -> list[str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_reaper()
        found = []
        for d in sorted(self.run_dir.iterdir()):
            if not (d / "launch.json").exists() or d.name in self._vms:
                continue
            files = self._files(d.name)
            pid = rf.read_pid(files.pidfile)
            launched = rf.launch_spec(files)
            taps = [n.id for n in tap_nics(launched.nics)] if launched is not None else []
            if pid is not None and process.is_guest(pid, d.name):
                vm = QemuVm(d.name, files, pid, process.started_at(pid), rf.launch_accel(files), taps=taps)
                vm.identity = cf.read_identity(files.dir)
                vm.cgroup = cf.cgroup_of(d.name, self._cgroup_tag) if vm.identity is not None else None
                self._vms[d.name] = vm
                try:
                    await self._monitor(vm)
                    status = await vm.monitor.execute("query-status") if vm.monitor else {}
                    vm.state = rf.state_of(status)
                except KasouError as e:
                    log.warning("VM %s runs but its monitor does not answer: %s", d.name, e)
                self._restore_migration(vm)
                self._start_heartbeat(vm)
                if repl.load(files.dir) or mirrors.load(files.dir):
                    self._disk_guard.ensure()
                found.append(d.name)
            else:
                state, reason = rf.read_exit(files)
                vm = QemuVm(d.name, files, pid or 0, None, rf.launch_accel(files))
                vm.state = state or RuntimeState.CRASHED
                vm.exit_reason = reason or "its process ended while the agent was away"
                saved = mig.load(files.migration)
                vm.incoming = saved if isinstance(saved, mig.Incoming) else None
                self._vms[d.name] = vm
                tpm.end(files.dir)
                await self._unplug(d.name, taps)  # its QEMU ended while the agent was away
        if self.confine.enabled:
            cf.remove_leftovers(self._cgroups_in_use(), self._cgroup_tag)
        return found

    def _cgroups_in_use(self) -> set[str]:
        return {n for n, vm in self._vms.items() if vm.state in PROCESS_STATES} | self._launching

    async def start(self, spec: LaunchSpec) -> RuntimeInfo:
        async with self._lock(spec.name):
            self._check_free(spec.name)
            boot = self._boot_files(spec.image)
            mirrored = [d for d in spec.disks if d.mirror]
            # Mirrored disks get their second copy before the guest runs a single instruction.
            launch = spec.model_copy(update={"paused": True}) if mirrored else spec
            argv = build_argv(launch, self._files(spec.name), self.accelerator, boot, self.qemu_binary,
                              firmware_code=self._firmware_code(spec),
                              cdrom=self.iso_file(spec.cdrom, spec.name))  # fmt: skip
            state = RuntimeState.PAUSED if launch.paused else RuntimeState.RUNNING
            async with self._launch(spec, argv, state) as vm:
                if mirrored:
                    await self._disk_guard.attach_at_start(vm, spec.disks)
                    if not spec.paused:
                        await self._qmp(vm, "cont")
                        vm.state = RuntimeState.RUNNING
            return vm.info()

    def _check_free(self, name: str) -> None:
        """Refuse a second QEMU for a VM that runs here (known, or found by its pid file)."""
        self._ensure_reaper()
        current = self._vms.get(name)
        if current is not None and current.state in PROCESS_STATES and process.alive(current.pid):
            raise Conflict(f"VM {name!r} already runs on this host (pid {current.pid})")
        stray = rf.read_pid(self._files(name).pidfile)
        if stray is not None and process.is_guest(stray, name):
            raise Conflict(f"VM {name!r} already runs on this host (pid {stray})")

    @contextlib.asynccontextmanager
    async def _launch(self, spec: LaunchSpec, argv: list[str], state: RuntimeState) -> AsyncIterator[QemuVm]:
        """Spawn QEMU and connect its monitor; the body finishes the set-up; the VM counts once it is done.

        On any failure (here or in the body): no process, no runtime files, no record in memory.
        """
        files = self._files(spec.name)
        ident = None
        if self.confine.enabled:  # before the old runtime directory goes: it records the VM's slot
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ident = cf.choose_identity(self.confine, self.run_dir, spec.name, self.accelerator)
        shutil.rmtree(files.dir, ignore_errors=True)
        files.dir.mkdir(parents=True, mode=0o700)
        files.serial_log.parent.mkdir(parents=True, exist_ok=True)
        if self._log_owner(files) != spec.uuid:  # an earlier VM's log never becomes this one's
            files.serial_log.unlink(missing_ok=True)
        files.serial_owner.write_text(spec.uuid)  # QEMU starts the log afresh (logappend=off): it is this VM's
        files.launch.write_text(json.dumps({"spec": spec.model_dump(), "accelerator": self.accelerator}))
        pid: int | None = None
        vm: QemuVm | None = None
        cgroup: cf.Cgroup | None = None
        taps = [n.id for n in tap_nics(spec.nics)]
        self._launching.add(spec.name)
        try:
            setup = None
            if ident is not None:
                cf.save_identity(files.dir, ident)
                cf.prepare_runtime(files.dir, files.serial_log, ident)
                for d in spec.disks:
                    for path in (d.path, d.mirror):
                        if path is not None:
                            cf.hand_over_disk(path, ident, spec.name, readonly=d.readonly)
                iso = self.iso_file(spec.cdrom, spec.name)
                if iso is not None:  # an ISO several VMs may share: readable, never the VM's
                    cf.hand_over_disk(iso, ident, spec.name, readonly=True)
                if spec.nvram is not None:  # the UEFI variables are the VM's, as its disks
                    cf.hand_over_disk(spec.nvram, ident, spec.name)
                if spec.tpm_state is not None:
                    tpm.hand_over(spec.name, Path(spec.tpm_state), ident)
                memory = (spec.memory_mib + self.confine.memory_overhead_mib) * 1024 * 1024
                if cf.cgroups_visible():
                    cgroup = cf.make_cgroup(spec.name, self._cgroup_tag, memory, spec.vcpus)
                else:  # no cgroup file system here at all (a service started by ip netns exec): said, not hidden
                    log.warning("VM %s runs without a cgroup: this agent sees no cgroup file system", spec.name)
                setup = cf.child_setup(ident, cgroup)
                argv = [*argv, *cf.sandbox_args()]
            if spec.cloud_init is not None:  # its NoCloud seed, made anew from the spec at each start
                await asyncio.to_thread(seed.make_seed, files.seed, spec.cloud_init, spec.name, spec.uuid, spec.nics)
                if ident is not None:
                    cf.hand_over_disk(str(files.seed), ident, spec.name, readonly=True)
            if spec.tpm_state is not None:  # QEMU connects to its TPM as it starts
                await tpm.start(spec.name, Path(spec.tpm_state), files.dir, setup)
            if taps:  # QEMU opens the taps by name: they must be on their bridges first
                owner = None if ident is None else (ident.uid, ident.gid)
                await asyncio.to_thread(self.network.plug, spec.name, spec.nics, owner)
            tap_fds: list[int] = []
            if ident is not None and taps:
                argv, tap_fds = cf.open_taps(argv)
            try:
                pid = await spawn.spawn(
                    spec.name, argv, files.qmp, files.output, files.pidfile, setup, START_TIMEOUT, tap_fds
                )
            finally:
                for fd in tap_fds:  # QEMU has its own copies
                    os.close(fd)
            vm = QemuVm(spec.name, files, pid, process.started_at(pid), self.accelerator, state=state, taps=taps)
            vm.identity, vm.cgroup = ident, cgroup
            await self._monitor(vm)
            yield vm
            self._vms[spec.name] = vm
            self._start_heartbeat(vm)
        except BaseException:
            if pid is not None:
                await process.kill_hard(pid)
            tpm.end(files.dir)
            if vm is not None:
                await self._detach(vm)
            failed = self._vms.pop(spec.name, None)
            if failed is not None:
                await self._detach(failed)
            await self._unplug(spec.name, taps)
            if cgroup is not None:
                cgroup.remove()
            if ident is not None:  # the log made for QEMU: kept if it holds why the start failed, root's again
                with contextlib.suppress(OSError):
                    if files.serial_log.stat().st_size == 0:
                        files.serial_log.unlink()
                cf.give_back(files.serial_log)
            shutil.rmtree(files.dir, ignore_errors=True)
            raise
        finally:
            self._launching.discard(spec.name)

    async def _monitor(self, vm: QemuVm) -> None:
        """Connect ``vm``'s monitor, replacing one that lost its connection or its events."""
        async with self._monitor_locks.setdefault(vm.name, asyncio.Lock()):
            if vm.monitor is not None and vm.monitor.healthy:
                return  # connected again by another caller meanwhile
            old, vm.monitor = vm.monitor, None
            if old is not None:
                await old.close()
            mon = Monitor(vm.name, vm.files.qmp, on_event=lambda ev, data: self._on_event(vm, ev, data))
            await mon.connect()
            vm.monitor = mon

    def _monitor_lost(self, vm: QemuVm) -> bool:
        """A live QEMU whose monitor (and with it its events) is gone, not on the way out."""
        if vm.state not in PROCESS_STATES or vm.expect_exit or vm.name in self._reconnecting:
            return False
        if vm.monitor is not None and vm.monitor.healthy:
            return False
        return time.monotonic() >= self._monitor_retry.get(vm.name, (0.0, 0.0))[0]

    def _reconnect_soon(self, vm: QemuVm) -> None:
        task = asyncio.create_task(self._reconnect(vm), name=f"monitor-{vm.name}")
        self._reconnecting.add(vm.name)
        self._unplugging.add(task)  # kept referenced until done (close cancels it)
        task.add_done_callback(self._unplugging.discard)
        task.add_done_callback(lambda _t: self._reconnecting.discard(vm.name))

    async def _reconnect(self, vm: QemuVm) -> None:
        """Connect a lost monitor again while QEMU lives, then catch up on what its events would have said."""
        mon = vm.monitor
        why = "is not connected" if mon is None or not mon.connected else f"lost its events ({mon.events_error})"
        log.error("the QMP monitor of VM %s (pid %d) %s while QEMU runs; connecting again", vm.name, vm.pid, why)
        try:
            await self._monitor(vm)
            assert vm.monitor is not None
            status = await vm.monitor.execute("query-status")
        except KasouError as e:
            if vm.expect_exit or not process.alive(vm.pid):
                return  # it is ending: the reaper records that
            wait = min(MONITOR_RETRY_MAX_S, 2 * self._monitor_retry.get(vm.name, (0.0, 0.5))[1])
            self._monitor_retry[vm.name] = (time.monotonic() + wait, wait)
            log.error("VM %s: its QMP monitor cannot be reached (%s); trying again in %.0f s", vm.name, e.message, wait)
            return
        self._monitor_retry.pop(vm.name, None)
        log.warning("VM %s: its QMP monitor is connected again; events missed meanwhile are caught up", vm.name)
        if vm.state in (RuntimeState.RUNNING, RuntimeState.PAUSED) and vm.outgoing is None:
            vm.state = rf.state_of(status)  # a pause (an I/O error) while no event could say so
        if (vm.files.dir / mirrors.RECORD).exists():
            await self._disk_guard.recover_io_error(vm)

    def _on_event(self, vm: QemuVm, event: str, data: dict[str, Any]) -> None:
        if event == "SHUTDOWN":
            reason = str(data.get("reason", "shutdown"))
            vm.expect_exit = True
            if vm.exit_reason in (MIGRATED, STOPPED):
                return  # ended on request, and the record says so (QEMU's own reason would be "host-qmp-quit")
            vm.exit_reason = reason
            with contextlib.suppress(OSError):
                vm.files.exit.write_text(json.dumps({"reason": reason, "time": time.time()}))
        elif event == "STOP" and vm.state == RuntimeState.RUNNING:
            vm.state = RuntimeState.PAUSED
        elif event == "RESUME" and vm.state == RuntimeState.PAUSED:
            vm.state = RuntimeState.RUNNING
        elif event == "BLOCK_IO_ERROR" and (vm.files.dir / mirrors.RECORD).exists():
            task = asyncio.create_task(self._disk_guard.recover_io_error(vm), name=f"io-error-{vm.name}")
            self._unplugging.add(task)  # kept referenced until done (close cancels it)
            task.add_done_callback(self._unplugging.discard)
        elif event == "DEVICE_DELETED":
            self._device_deleted(vm, str(data.get("device") or ""))
        elif event == "RESET":
            vm.guest_ready = False
            vm.guest_uptime = None
            vm.last_heartbeat = None
            vm.agent_state.forget()  # a reset guest must answer again before it counts (HA, readiness)

    def _device_deleted(self, vm: QemuVm, device: str) -> None:
        """QEMU took a device out of ``vm`` (an unplug the guest agreed to); see driver_devices."""

    def _start_heartbeat(self, vm: QemuVm) -> None:
        vm.heartbeat_task = asyncio.create_task(
            guest.read_heartbeat(vm, lambda: vm.state in PROCESS_STATES), name=f"heartbeat-{vm.name}"
        )
        vm.agent = qga.GuestAgent(vm.files.guest_agent)
        vm.agent_task = asyncio.create_task(
            qga.poll(vm.agent, vm.agent_state, lambda: vm.state in PROCESS_STATES,
                     lambda: vm.state == RuntimeState.RUNNING and vm.outgoing is None),
            name=f"guest-agent-{vm.name}",
        )  # fmt: skip

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="qemu-reaper")

    async def _reap(self) -> None:
        """Notice processes that ended: exited on request, or crashed."""
        rounds = 0
        while True:
            for vm in list(self._vms.values()):
                if vm.state in PROCESS_STATES and not process.alive(vm.pid):
                    await self._ended(vm, locked=False)
                elif self._monitor_lost(vm):
                    self._reconnect_soon(vm)
            rounds += 1
            if self.confine.enabled and rounds % 40 == 0:  # a cgroup whose QEMU was not yet reaped when it ended
                cf.remove_leftovers(self._cgroups_in_use(), self._cgroup_tag)
            await asyncio.sleep(0.25)

    def _mark_gone(self, vm: QemuVm) -> None:
        reason = vm.exit_reason or rf.read_exit(vm.files)[1]
        if vm.expect_exit or reason:
            vm.state = RuntimeState.EXITED
            vm.exit_reason = reason or STOPPED
        else:
            vm.state = RuntimeState.CRASHED
            vm.exit_reason = "the QEMU process ended unexpectedly"
            if vm.incoming is not None:
                vm.exit_reason = "the QEMU waiting for the incoming migration ended (the migration failed)"
        with contextlib.suppress(OSError):
            vm.files.exit.write_text(json.dumps({"reason": vm.exit_reason, "state": vm.state.value}))
        tpm.end(vm.files.dir)  # its swtpm ends with QEMU (--terminate); one that lingers is ended here
        if vm.cgroup is not None:
            vm.cgroup.remove()
        if vm.identity is not None:  # its uid may serve another VM later
            cf.give_back(vm.files.serial_log)

    async def _ended(self, vm: QemuVm, locked: bool = True) -> None:
        """Its QEMU is gone: record why, stop watching it and remove its taps.

        ``locked``: the caller holds the VM's lock. Otherwise (the reaper, a status read) the taps
        go in a task that waits for the lock, so they are never pulled from under a start of the
        same VM that has just made them anew.
        """
        self._mark_gone(vm)
        await self._detach(vm)
        if locked:
            await self._unplug(vm.name, vm.taps)
        elif vm.taps:
            task = asyncio.create_task(self._unplug_when_free(vm), name=f"unplug-{vm.name}")
            self._unplugging.add(task)
            task.add_done_callback(self._unplugging.discard)

    async def _unplug_when_free(self, vm: QemuVm) -> None:
        async with self._lock(vm.name):
            current = self._vms.get(vm.name)
            if current is not None and current is not vm and current.state in PROCESS_STATES:
                return  # started again meanwhile: the taps are its new QEMU's
            await self._unplug(vm.name, vm.taps)

    async def _unplug(self, name: str, taps: list[str]) -> None:
        """Delete the taps of a VM whose QEMU is gone (bridges stay); a failure is logged, never raised."""
        if not taps:
            return
        try:
            await asyncio.to_thread(self.network.unplug, name, taps)
        except Exception as e:
            log.error("could not remove the taps of VM %s: %s", name, e.message if isinstance(e, KasouError) else e)

    async def _detach(self, vm: QemuVm) -> None:
        for task in (vm.heartbeat_task, vm.agent_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        vm.heartbeat_task = vm.agent_task = None
        vm.agent_state.answering = False
        if vm.monitor is not None:
            await vm.monitor.close()
            vm.monitor = None

    # -- operations ------------------------------------------------------------------

    def _running(self, name: str) -> QemuVm:
        """The VM whose guest lives here, for an operation on it (not while it migrates)."""
        vm = self._vms.get(name)
        if vm is None or vm.state not in PROCESS_STATES:
            raise NotFound(f"VM {name!r} is not running on this host")
        if vm.state == RuntimeState.INCOMING:
            raise WrongState(f"VM {name!r} is arriving by migration on this host; it does not run here yet")
        if vm.outgoing is not None:
            raise WrongState(f"VM {name!r} is migrating to another host; finish or abort that first")
        return vm

    async def _qmp(self, vm: QemuVm, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if vm.monitor is None or not vm.monitor.connected:
            await self._monitor(vm)
        assert vm.monitor is not None
        if vm.identity is not None and command == "blockdev-add":
            for path in cf.files_in(arguments):  # a snapshot overlay, a mirror's copy, a backup target
                cf.hand_over_disk(path, vm.identity, vm.name)
        return await vm.monitor.execute(command, arguments)

    def _tls_for(self, vm: QemuVm) -> Path | None:
        """The TLS credentials directory this VM's QEMU reads (a copy of its own when it is confined)."""
        if self.tls_dir is None or vm.identity is None:
            return self.tls_dir
        return cf.copy_tls(self.tls_dir, vm.files.dir, vm.identity)

    async def powerdown(self, name: str) -> None:
        async with self._lock(name):
            vm = self._running(name)
            vm.expect_exit = True
            await self._qmp(vm, "system_powerdown")
            vm.state = RuntimeState.SHUTTING_DOWN

    async def guest_shutdown(self, name: str) -> None:
        async with self._lock(name):
            vm = self._running(name)
            if vm.agent is None or not vm.agent_state.answering:
                raise WrongState(f"VM {name!r} has no guest agent answering; press its power button instead")
            await vm.agent.shutdown()
            vm.expect_exit = True
            vm.state = RuntimeState.SHUTTING_DOWN

    def _quiesce(self, vm: QemuVm) -> contextlib.AbstractAsyncContextManager[list[qga.Consistency]]:
        """Freeze the guest's file systems around a point in time, if its agent answers (see qga.quiesced)."""
        return qga.quiesced(vm.agent, vm.agent_state if vm.state == RuntimeState.RUNNING else None)

    async def stop(self, name: str) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None:
                raise NotFound(f"VM {name!r} is not running on this host")
            if vm.state not in PROCESS_STATES:
                return
            vm.expect_exit = True
            vm.exit_reason = vm.exit_reason or STOPPED
            with contextlib.suppress(KasouError):
                await self._qmp(vm, "quit")
            if not await process.wait_gone(vm.pid, QUIT_TIMEOUT / 2):
                await process.kill_hard(vm.pid, QUIT_TIMEOUT)
            if process.alive(vm.pid):
                raise QemuStartError(f"the QEMU process of VM {name!r} (pid {vm.pid}) will not end")
            await self._ended(vm)

    async def reset(self, name: str) -> None:
        async with self._lock(name):
            await self._qmp(self._running(name), "system_reset")

    async def pause(self, name: str) -> None:
        async with self._lock(name):
            vm = self._running(name)
            await self._qmp(vm, "stop")
            vm.state = RuntimeState.PAUSED

    async def resume(self, name: str) -> None:
        async with self._lock(name):
            vm = self._running(name)
            await self._qmp(vm, "cont")
            vm.state = RuntimeState.RUNNING

    async def info(self, name: str) -> RuntimeInfo | None:
        vm = self._vms.get(name)
        if vm is not None and vm.state in PROCESS_STATES and not process.alive(vm.pid):
            await self._ended(vm, locked=False)
        return vm.info() if vm is not None else None

    async def list(self) -> list[RuntimeInfo]:
        out = []
        for name in sorted(self._vms):
            info = await self.info(name)
            if info is not None:
                out.append(info)
        return out

    async def forget(self, name: str) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is not None and vm.state in PROCESS_STATES and process.alive(vm.pid):
                raise Conflict(f"VM {name!r} still runs; stop it first")
            if vm is not None:
                await self._detach(vm)
            launched = rf.launch_spec(self._files(name))
            taps = vm.taps if vm is not None else [n.id for n in tap_nics(launched.nics)] if launched else []
            await self._unplug(name, taps)
            self._vms.pop(name, None)
            shutil.rmtree(self._files(name).dir, ignore_errors=True)

    async def console_log(self, name: str, max_bytes: int = 65536, uuid: str | None = None) -> str:
        files = self._files(name)
        path = files.serial_log
        if uuid is not None and self._log_owner(files) != uuid:
            raise NotFound(f"VM {name!r} has no console output on this host")
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            raise NotFound(f"VM {name!r} has no console output on this host") from None

    async def vnc_socket(self, name: str) -> Path | None:
        """QEMU's VNC display of a running (or paused) guest: ``-vnc unix:<run dir>/<vm>/vnc.sock``."""
        return self._guest_socket(name, "vnc")

    async def serial_socket(self, name: str) -> Path | None:
        """QEMU's serial console of a running (or paused) guest: ``<run dir>/<vm>/serial.sock``."""
        return self._guest_socket(name, "serial")

    def _guest_socket(self, name: str, which: str) -> Path | None:
        vm = self._vms.get(name)
        if vm is None or vm.state not in GUEST_STATES or not process.alive(vm.pid):
            return None
        path: Path = getattr(self._files(name), which)
        return path if path.is_socket() else None

    # -- QMP for the helper modules ------------------------------------------------------

    def _exec(self, vm: QemuVm) -> mig.Execute:
        async def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
            return await self._qmp(vm, command, arguments)

        return execute

    def _fd_sender(self, vm: QemuVm) -> snap.SendFd:
        async def send(fdname: str, fd: int) -> None:
            if vm.monitor is None or not vm.monitor.connected:
                await self._monitor(vm)
            assert vm.monitor is not None
            await vm.monitor.send_fd(fdname, fd)

        return send

    def _restore_migration(self, vm: QemuVm) -> None:
        """After an agent restart: pick up a migration this host was part of (see driver_migration)."""

    async def close(self) -> None:
        await self._disk_guard.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for vm in list(self._vms.values()):
            await self._detach(vm)
        for task in list(self._unplugging):  # a VM found dead by the next attach_all is unplugged then
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["DriverCore", "MonitorError"]
