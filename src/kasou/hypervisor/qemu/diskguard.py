"""Watches the replicas and mirrored disks of the VMs whose guest runs on this host: cuts a replica that
hangs so the guest's writes go on (replication.py), acts on a mirrored disk's copy that vanished or failed
and recovers from an I/O-error pause by switching to the other copy (mirrors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kasou.errors import KasouError
from kasou.hypervisor.base import LaunchDisk
from kasou.hypervisor.qemu import mirrors
from kasou.hypervisor.qemu import replication as repl
from kasou.hypervisor.qemu.migration import Execute

log = logging.getLogger(__name__)


class DiskGuard:
    """One per driver. ``live()``: the VMs whose guest runs here (objects with ``name``, ``pid``, ``files``);
    ``execute(vm)``: a QMP caller for one of them."""

    def __init__(self, live: Callable[[], list[Any]], execute: Callable[[Any], Execute]) -> None:
        self._live = live
        self._execute = execute
        self._locks: dict[str, asyncio.Lock] = {}  # one repair of a VM's mirrored disks at a time
        self._stalls = repl.StallWatch()
        self._task: asyncio.Task[None] | None = None

    def forget_replica(self, name: str, disk_id: str) -> None:
        """A replica that was detached: its stall record goes."""
        self._stalls.forget(name, disk_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def attach_at_start(self, vm: Any, disks: list[LaunchDisk]) -> None:
        """Attach each mirrored disk's second copy as ``vm`` starts (paused); one that cannot be opened leaves
        the disk degraded, the VM starts."""
        for d in disks:
            if not d.mirror:
                continue
            try:
                await mirrors.attach(self._execute(vm), vm.files.dir, disks, d.id, d.mirror, d.mirror_sync)
            except KasouError as e:
                log.error("VM %s disk %s starts on one copy: %s", vm.name, d.id, e.message)
                records = mirrors.load(vm.files.dir)
                records[d.id] = mirrors.Mirrored(
                    disk_id=d.id, source=d.path, target=None, since=time.time(),
                    error=f"the second copy {d.mirror} could not be opened: {e.message}", failed=d.mirror,
                    source_ino=mirrors.file_id(d.path),
                )  # fmt: skip
                mirrors.save(vm.files.dir, records)
        self.ensure()

    async def recover_io_error(self, vm: Any) -> None:
        """A disk of ``vm`` paused on an I/O error: switch it to its second copy and resume (mirrors.py)."""
        try:
            async with self._lock(vm.name):
                for line in await mirrors.recover_io_errors(self._execute(vm), vm.files.dir):
                    log.error("VM %s: %s", vm.name, line)
        except KasouError as e:
            log.error("VM %s: cannot recover from an I/O error: %s", vm.name, e.message)

    def _lock(self, name: str) -> asyncio.Lock:
        """Serialises the I/O-error recovery and the guard's look at one VM's mirrored disks."""
        return self._locks.setdefault(name, asyncio.Lock())

    def ensure(self) -> None:
        """Start watching (once: a no-op while the watch runs)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch(), name="replica-guard")

    async def _watch(self) -> None:
        """Cut the connection of a replica that hangs, so the guest's writes go on (see replication.py);
        act on a mirrored disk's copy that vanished or failed (see mirrors.py)."""
        while True:
            await asyncio.sleep(repl.GUARD_PERIOD_S)
            for vm in self._live():
                if (vm.files.dir / mirrors.RECORD).exists():
                    try:
                        async with self._lock(vm.name):
                            found = await mirrors.watch(self._execute(vm), vm.files.dir)
                        for line in found:
                            log.error("VM %s: %s", vm.name, line)
                    except KasouError as e:
                        log.warning("cannot watch the mirrored disks of VM %s: %s", vm.name, e.message)
                if (vm.files.dir / repl.RECORD).exists():
                    try:
                        await repl.guard(self._execute(vm), vm.name, vm.pid, vm.files.dir, self._stalls)
                    except KasouError as e:
                        log.warning("cannot watch the replicas of VM %s: %s", vm.name, e.message)
