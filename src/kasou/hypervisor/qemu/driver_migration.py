"""Live migration in the QEMU driver, both sides, as small steps the control plane orchestrates.

The QMP steps and helpers are in :mod:`kasou.hypervisor.qemu.migration`; the order of the steps
and why both copies never run at once is in :class:`kasou.hypervisor.base.Driver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path

from kasou.errors import (
    AlreadyExists,
    Conflict,
    HypervisorError,
    InvalidSpec,
    KasouError,
    MonitorError,
    NotFound,
    WrongState,
)
from kasou.hypervisor.base import IncomingInfo, LaunchSpec, MigrationStatus, MigrationStorage, RuntimeInfo, RuntimeState
from kasou.hypervisor.qemu import firmware as fw
from kasou.hypervisor.qemu import migration as mig
from kasou.hypervisor.qemu import process
from kasou.hypervisor.qemu import replication as repl
from kasou.hypervisor.qemu import runfiles as rf
from kasou.hypervisor.qemu import tls as qtls
from kasou.hypervisor.qemu.cmdline import build_argv
from kasou.hypervisor.qemu.driver_core import GUEST_STATES, MIGRATED, PROCESS_STATES, QUIT_TIMEOUT, DriverCore, QemuVm
from kasou.model.firmware import VARS_ID


def copied_nodes(spec: LaunchSpec) -> list[str]:
    """The block nodes a migration with local disks copies: every disk, and the UEFI variable store."""
    return [d.id for d in spec.disks] + ([VARS_ID] if spec.nvram is not None else [])


class MigrationOps(DriverCore):
    """The live-migration steps of the QEMU driver."""

    def _save_migration(self, vm: QemuVm) -> None:
        with contextlib.suppress(OSError):
            mig.save(vm.files.migration, vm.outgoing or vm.incoming)

    def _restore_migration(self, vm: QemuVm) -> None:
        """After an agent restart: pick up a migration this host was part of."""
        saved = mig.load(vm.files.migration)
        if isinstance(saved, mig.Incoming) and vm.state == RuntimeState.PAUSED:
            vm.incoming, vm.state = saved, RuntimeState.INCOMING
        elif isinstance(saved, mig.Outgoing):
            vm.outgoing = saved
            if saved.phase == "mirroring":
                task = self._mirror_then_migrate(vm, saved)
                saved.task = asyncio.create_task(task, name=f"mirror-{vm.name}")

    async def prepare_incoming(self, spec: LaunchSpec, storage: MigrationStorage, listen_host: str) -> IncomingInfo:
        async with self._lock(spec.name):
            self._check_free(spec.name)
            if storage == "copy":
                for d in spec.disks:
                    if d.readonly:
                        raise InvalidSpec(f"read-only disk {d.id} cannot be copied; use shared storage")
                    if d.size_bytes is None:
                        raise InvalidSpec(f"disk {d.id} needs size_bytes to be copied", field="disks")
                    if Path(d.path).exists():
                        raise AlreadyExists(f"disk {d.path} already exists on this host")
            # The TPM's state always arrives in a new directory (swtpm locks the one it runs on: see tpm.py).
            for path in (spec.nvram if storage == "copy" else None, spec.tpm_state):
                if path is not None and Path(path).exists():
                    raise AlreadyExists(f"{path} already exists on this host")
            boot = self._boot_files(spec.image)
            files = self._files(spec.name)
            argv = build_argv(spec, files, self.accelerator, boot, self.qemu_binary, incoming="defer",
                              firmware_code=self._firmware_code(spec),
                              cdrom=self.iso_file(spec.cdrom, spec.name))  # fmt: skip
            created: list[str] = []
            try:
                for d in spec.disks if storage == "copy" else []:
                    assert d.size_bytes is not None
                    Path(d.path).parent.mkdir(parents=True, exist_ok=True)
                    created.append(d.path)
                    await mig.create_disk(Path(d.path), d.format, d.size_bytes)
                if storage == "copy" and spec.nvram is not None:  # filled by the mirror, then by QEMU itself
                    created.append(spec.nvram)
                    fw.make_vars(Path(spec.nvram), spec.firmware, self.ovmf_dir)
                if spec.tpm_state is not None:  # filled by the migration stream
                    created.append(spec.tpm_state)
                    Path(spec.tpm_state).mkdir(parents=True, mode=0o700)
                async with self._launch(spec, argv, RuntimeState.INCOMING) as vm:
                    execute = self._exec(vm)
                    creds = None
                    if self.tls_dir is not None:  # the source must come with a certificate of the site CA
                        tls = self._tls_for(vm)
                        assert tls is not None
                        creds = await qtls.ensure_creds(execute, "server", tls)
                    nbd_port, exports = None, {}
                    if storage == "copy":
                        nbd_port = await mig.start_nbd_server(execute, listen_host, creds)
                        exports = await mig.export_disks(execute, copied_nodes(spec))
                    uri = await mig.start_incoming(execute, listen_host, creds)
                    info = IncomingInfo(
                        storage=storage,
                        migration_uri=uri,
                        nbd_host=listen_host if nbd_port is not None else None,
                        nbd_port=nbd_port,
                        exports=exports,
                        tls=creds is not None,
                    )
                    vm.incoming = mig.Incoming(info, created)
                    self._save_migration(vm)
                return info
            except BaseException:
                rf.remove_disks(created)
                raise

    async def migrate_out(
        self,
        name: str,
        incoming: IncomingInfo,
        downtime_ms: int = 100,
        auto_converge: bool = True,
        bandwidth_mib_s: int | None = None,
    ) -> None:
        async with self._lock(name):
            vm = self._running(name)
            execute = self._exec(vm)
            now = await execute("query-migrate")
            if mig.is_active(str(now.get("status", "none"))):
                raise Conflict(f"VM {name!r} is already migrating")
            if repl.load(vm.files.dir):
                raise Conflict(f"VM {name!r} has a disk replica attached; detach it before migrating")
            spec = rf.launch_spec(vm.files)
            disks = copied_nodes(spec) if spec is not None and incoming.storage == "copy" else []
            if incoming.storage == "copy" and spec is None:
                raise HypervisorError(f"the launch record of VM {name!r} is missing; cannot copy its disks")
            if incoming.tls and self.tls_dir is None:
                raise Conflict(f"the destination of VM {name!r} takes the migration over TLS only, "
                               "but this host has no TLS files (kasou tls issue)")  # fmt: skip
            if not incoming.tls and self.tls_dir is not None:
                raise Conflict(f"the destination of VM {name!r} offers plain TCP; this host migrates over TLS only")
            running = (await execute("query-status")).get("status") == "running"
            creds = None
            tls = self._tls_for(vm)
            if tls is not None:
                creds = await qtls.ensure_creds(execute, "client", tls)
            host = qtls.uri_host(incoming.migration_uri)
            await mig.set_parameters(execute, downtime_ms, auto_converge, bandwidth_mib_s, creds, host)
            ram = spec.memory_mib * mig.MiB if spec is not None else 0
            out = mig.Outgoing(incoming=incoming, disks=disks, was_running=running, ram_bytes=ram)
            if disks:
                await mig.start_mirrors(execute, incoming, disks, bandwidth_mib_s, creds)
                out.phase = "mirroring"
                out.task = asyncio.create_task(self._mirror_then_migrate(vm, out), name=f"mirror-{name}")
            else:
                await execute("migrate", {"uri": incoming.migration_uri})
            vm.outgoing = out
            self._save_migration(vm)

    async def _mirror_then_migrate(self, vm: QemuVm, out: mig.Outgoing) -> None:
        """Background part of a copy-storage migrate_out: once the disks are in sync, send the memory."""
        execute = self._exec(vm)
        try:
            await mig.wait_mirrors_ready(execute, out.disks)
            async with self._lock(vm.name):
                if vm.outgoing is not out:
                    return
                await execute("migrate", {"uri": out.incoming.migration_uri})
                out.phase = "migrating"
                out.mirror_ms = int((time.time() - out.started) * 1000)
                self._save_migration(vm)
        except Exception as e:  # recorded for migration_status; abort_out cleans up
            out.phase, out.error = "failed", e.message if isinstance(e, KasouError) else repr(e)
            self._save_migration(vm)

    async def migration_status(self, name: str) -> MigrationStatus:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None or vm.state not in PROCESS_STATES:
                raise NotFound(f"VM {name!r} is not running on this host")
            execute = self._exec(vm)
            out = vm.outgoing
            if out is None:
                if vm.state == RuntimeState.INCOMING:  # the destination's own view
                    return mig.status_from(await execute("query-migrate"))
                return MigrationStatus(status="none")  # QEMU's last one was finished or aborted
            before = out.to_json()
            query = await execute("query-migrate")
            jobs = await execute("query-block-jobs") if out.disks else []
            status = str(query.get("status", "none"))
            if out.phase == "migrating" and out.disks and not out.reported_completed:
                why = mig.mirror_failure(jobs, out.disks)
                if why is not None and mig.is_active(status):
                    await mig.cancel_migration(execute)  # the destination's disks would be stale
                    out.phase, out.error = "failed", why
                elif why is None and status == "completed":
                    try:
                        await mig.finish_mirrors(execute, out.disks, force=False)
                    except KasouError as e:
                        out.phase, out.error = "failed", e.message
                elif why is not None and status == "completed":
                    out.phase, out.error = "failed", why
            mirror_ms = out.mirror_ms
            if out.phase == "mirroring":
                mirror_ms = int((time.time() - out.started) * 1000)
            result = mig.status_from(
                query,
                phase=out.phase,
                mirror_jobs=jobs,
                disk_ids=out.disks,
                ram_bytes=out.ram_bytes,
                mirror_ms=mirror_ms,
                error=out.error,
            )
            if result.status == "completed":
                out.reported_completed = True
            if out.to_json() != before:
                self._save_migration(vm)
            return result

    async def finish_incoming(self, name: str) -> RuntimeInfo:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is not None and vm.state in GUEST_STATES and vm.incoming is None:
                return vm.info()  # finished already
            if vm is None or vm.state != RuntimeState.INCOMING or vm.incoming is None:
                raise NotFound(f"VM {name!r} is not arriving on this host")
            execute = self._exec(vm)
            await mig.wait_incoming_done(execute)  # the source is paused for good only then
            if vm.incoming.info.storage == "copy":
                with contextlib.suppress(MonitorError):  # not running (e.g. after a retry)
                    await execute("nbd-server-stop")
            await execute("cont")
            vm.state, vm.incoming = RuntimeState.RUNNING, None
            self._save_migration(vm)
            return vm.info()

    async def finish_out(self, name: str) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None:
                return  # finished already
            if vm.state not in PROCESS_STATES:
                raise WrongState(f"VM {name!r} is not running on this host")
            out = vm.outgoing
            execute = self._exec(vm)
            query = await execute("query-migrate")
            if out is None or query.get("status") != "completed" or out.phase == "failed":
                raise WrongState(f"VM {name!r} has no completed migration to finish here")
            with contextlib.suppress(KasouError):
                await mig.finish_mirrors(execute, out.disks, force=False)
            await mig.remove_nbd_nodes(execute, out.disks)
            vm.expect_exit, vm.exit_reason = True, MIGRATED
            with contextlib.suppress(OSError):
                record = {"reason": MIGRATED, "state": "exited", "time": time.time()}
                vm.files.exit.write_text(json.dumps(record))
            with contextlib.suppress(KasouError):
                await execute("quit")
            if not await process.wait_gone(vm.pid, QUIT_TIMEOUT / 2):
                await process.kill_hard(vm.pid, QUIT_TIMEOUT)
            if process.alive(vm.pid):
                raise HypervisorError(f"the QEMU process of VM {name!r} (pid {vm.pid}) will not end")
            await self._ended(vm)
            self._vms.pop(name, None)
            shutil.rmtree(vm.files.dir, ignore_errors=True)

    async def abort_out(self, name: str, force: bool = False) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None or vm.state not in GUEST_STATES:
                raise NotFound(f"VM {name!r} is not running on this host")
            out = vm.outgoing
            if out is None:
                return  # nothing to abort
            if out.reported_completed and not force:
                raise WrongState(
                    f"the migration of VM {name!r} completed and the destination may run it; "
                    "abort there first, then abort here with force"
                )
            if out.task is not None:
                out.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await out.task
            execute = self._exec(vm)
            await mig.cancel_migration(execute)
            await mig.finish_mirrors(execute, out.disks, force=True)
            await mig.remove_nbd_nodes(execute, out.disks)
            if out.was_running and (await execute("query-status")).get("status") != "running":
                await execute("cont")  # left paused by the switch-over (postmigrate) or a failure
            if out.was_running:
                vm.state = RuntimeState.RUNNING
            vm.outgoing = None
            self._save_migration(vm)

    async def abort_incoming(self, name: str) -> None:
        async with self._lock(name):
            vm = self._vms.get(name)
            if vm is None:
                return  # nothing here
            if vm.state in GUEST_STATES or vm.incoming is None:
                raise WrongState(f"VM {name!r} is not arriving on this host; there is no migration to abort")
            if vm.state == RuntimeState.INCOMING:
                vm.expect_exit, vm.exit_reason = True, "incoming migration aborted"
                await process.kill_hard(vm.pid, QUIT_TIMEOUT)
                if process.alive(vm.pid):
                    raise HypervisorError(f"the QEMU process of VM {name!r} (pid {vm.pid}) will not end")
                self._mark_gone(vm)
            await self._detach(vm)
            await self._unplug(name, vm.taps)
            self._vms.pop(name, None)
            rf.remove_disks(vm.incoming.created if vm.incoming else [])
            shutil.rmtree(vm.files.dir, ignore_errors=True)
            vm.files.serial_log.unlink(missing_ok=True)
            vm.files.serial_owner.unlink(missing_ok=True)
