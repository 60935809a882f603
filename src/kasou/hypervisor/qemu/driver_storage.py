"""The QEMU driver's storage operations on a running VM: disk replication to another host, mirrored disks,
snapshots (with memory), restore of a snapshot's memory, backups. The QMP steps are in their own modules
(replication.py, mirrors.py, snapshots.py, backups.py); this class holds the VM's lock around them."""

from __future__ import annotations

import builtins
import contextlib
from pathlib import Path

from kasou.errors import KasouError, NotFound
from kasou.hypervisor.backups import BackupDisk, BackupDiskResult
from kasou.hypervisor.base import LaunchSpec, MirrorStatus, ReplicaExports, ReplicaStatus, RuntimeInfo, RuntimeState
from kasou.hypervisor.qemu import backups as qbackups
from kasou.hypervisor.qemu import confine as cf
from kasou.hypervisor.qemu import mirrors
from kasou.hypervisor.qemu import replication as repl
from kasou.hypervisor.qemu import runfiles as rf
from kasou.hypervisor.qemu import snapshots as snap
from kasou.hypervisor.qemu.cmdline import build_argv
from kasou.hypervisor.qemu.driver_core import GUEST_STATES, DriverCore
from kasou.hypervisor.snapshots import SnapshotMerge, SnapshotMerged, SnapshotTake, SnapshotTaken


class StorageOps(DriverCore):
    """Replication, mirrors, snapshots and backups of the VMs running here."""

    # -- disk replication (the QMP steps and the daemons are in replication.py) ----------------

    async def attach_replica(
        self, name: str, disk_id: str, nbd_host: str, nbd_port: int, export: str, timeout_s: float = 60.0
    ) -> ReplicaStatus:
        async with self._lock(name):
            vm = self._running(name)
            spec = rf.launch_spec(vm.files)
            disks = spec.disks if spec is not None else []
            await repl.attach(self._exec(vm), vm.pid, vm.files.dir, disks, disk_id, nbd_host, nbd_port, export,
                              tls_dir=self._tls_for(vm))  # fmt: skip
            self._disk_guard.ensure()
        try:
            if timeout_s > 0:
                await repl.wait_in_sync(self._exec(vm), disk_id, timeout_s)
        except BaseException:
            with contextlib.suppress(KasouError):
                await self.detach_replica(name, disk_id)
            raise
        return next(s for s in await self.replica_status(name) if s.disk_id == disk_id)

    async def replica_status(self, name: str) -> builtins.list[ReplicaStatus]:
        vm = self._vms.get(name)
        if vm is None or vm.state not in GUEST_STATES:
            raise NotFound(f"VM {name!r} is not running on this host")
        spec = rf.launch_spec(vm.files)
        return await repl.status(self._exec(vm), vm.files.dir, [d.id for d in spec.disks] if spec else [])

    async def detach_replica(self, name: str, disk_id: str) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None or vm.state not in GUEST_STATES:
                return  # its QEMU (and with it the mirror) is gone
            await repl.detach(self._exec(vm), vm.pid, vm.files.dir, disk_id)
            self._disk_guard.forget_replica(name, disk_id)

    def replica_exports(self) -> ReplicaExports:
        return self._replica_exports

    # -- snapshots (the QMP steps are in snapshots.py) -------------------------------------------

    async def snapshot(self, name: str, req: SnapshotTake) -> SnapshotTaken:
        async with self._lock(name):
            vm = self._running(name)
            quiesce = lambda: self._quiesce(vm)  # noqa: E731
            return await snap.take_live(self._exec(vm), self._fd_sender(vm), vm.files, name, req, quiesce)

    async def merge_snapshot(self, name: str, req: SnapshotMerge) -> SnapshotMerged:
        async with self._lock(name):
            vm = self._running(name)
            return await snap.merge_live(self._exec(vm), vm.files, name, req)

    async def restore(self, spec: LaunchSpec, state_path: str) -> RuntimeInfo:
        async with self._lock(spec.name):
            self._check_free(spec.name)
            boot = self._boot_files(spec.image)
            argv = build_argv(spec, self._files(spec.name), self.accelerator, boot, self.qemu_binary, incoming="defer",
                              firmware_code=self._firmware_code(spec),
                              cdrom=self.iso_file(spec.cdrom, spec.name))  # fmt: skip
            async with self._launch(spec, argv, RuntimeState.PAUSED) as vm:
                await snap.finish_restore(self._exec(vm), self._fd_sender(vm), state_path, spec.paused)
                vm.state = RuntimeState.PAUSED if spec.paused else RuntimeState.RUNNING
            return vm.info()

    # -- mirrored disks (RAID-1 on one host; the QMP steps are in mirrors.py) ----------------------

    async def attach_mirror(self, name: str, disk_id: str, target: str, sync: str = "full") -> MirrorStatus:
        async with self._lock(name):
            vm = self._running(name)
            spec = rf.launch_spec(vm.files)
            disks = spec.disks if spec is not None else []
            mode: mirrors.MirrorSync = "none" if sync == "none" else "full"
            status = await mirrors.attach(self._exec(vm), vm.files.dir, disks, disk_id, target, mode)
            self._disk_guard.ensure()
            return status

    async def mirror_status(self, name: str) -> builtins.list[MirrorStatus]:
        vm = self._vms.get(name)
        if vm is None or vm.state not in GUEST_STATES:
            raise NotFound(f"VM {name!r} is not running on this host")
        spec = rf.launch_spec(vm.files)
        return await mirrors.status(self._exec(vm), vm.files.dir, [d.id for d in spec.disks] if spec else [])

    async def detach_mirror(self, name: str, disk_id: str) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None or vm.state not in GUEST_STATES:
                return
            await mirrors.detach(self._exec(vm), vm.files.dir, disk_id)

    async def backup_disks(
        self, name: str, backup_id: str, disks: builtins.list[BackupDisk], timeout_s: float = 1800.0
    ) -> builtins.list[BackupDiskResult]:
        async with self._lock(name):  # the QMP steps are in kasou.hypervisor.qemu.backups
            vm = self._running(name)
            try:
                return await qbackups.run(self._exec(vm), backup_id, disks, timeout_s, lambda: self._quiesce(vm))
            finally:
                if vm.identity is not None:  # the generations are root's again once QEMU is done with them
                    for d in disks:
                        for f in Path(d.target).parent.iterdir():
                            cf.give_back(f)
