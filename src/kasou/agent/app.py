"""The host agent's HTTP API (FastAPI). Only the control plane calls it.

Routes are under ``/agent/v1``. On a single host it listens on a unix socket
that only root can open; that socket's permissions are its authentication.
On TCP it serves mutual TLS, and answers only kasou hosts (:mod:`kasou.peers`): a
certificate of the site CA that carries kasou's host marker or names a host of the
registry; anything else the CA signed gets 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import PlainTextResponse

from kasou import __version__
from kasou.agent import pools
from kasou.agent.backups import BackupFiles, add_backup_routes
from kasou.agent.console import add_console_routes
from kasou.agent.devices import add_device_routes
from kasou.agent.firmware import FirmwareState, add_firmware_routes
from kasou.agent.hostinfo import HostInfo, cpu_count, load_1m, memory_mib
from kasou.agent.models import DiskCreate, DiskInfo, MediaChange
from kasou.agent.offsite import Offsite, add_offsite_routes
from kasou.agent.pools import PRIVATE_UMASK, PoolRef, PoolUsage, make_private
from kasou.agent.replicas import ReplicaCreate, ReplicaInfo, ReplicaPromotion, ReplicaRemoval, Replicas
from kasou.agent.snapshots import AgentSnapshots
from kasou.agent.sources import Sources
from kasou.agent.storage import LocalDisks
from kasou.agent.transfers import Transfers, add_transfer_routes
from kasou.config import ovmf_dir
from kasou.errors import InvalidSpec, NotFound
from kasou.hypervisor.base import (
    AbortRequest,
    Driver,
    GuestExec,
    GuestExecRequest,
    IncomingInfo,
    IncomingRequest,
    LaunchSpec,
    MigrateRequest,
    MigrationStatus,
    MirrorAttach,
    MirrorStatus,
    ReplicaAttach,
    ReplicaStatus,
    ReplicaTarget,
    RuntimeInfo,
    RuntimeState,
)
from kasou.hypervisor.snapshots import (
    SnapshotMerge,
    SnapshotMerged,
    SnapshotRestore,
    SnapshotRevert,
    SnapshotTake,
    SnapshotTaken,
)
from kasou.hypervisor.stats import StatsReport, host_stats
from kasou.peers import KasouPeers, KnownHosts, Revoked
from kasou.wire import install_error_handlers

log = logging.getLogger("kasou.agent")


class Agent:
    """The agent's state: the driver, the local disks and how this host is named."""

    def __init__(
        self,
        host: str,
        driver: Driver,
        disks: LocalDisks,
        accelerator: str,
        accelerator_reason: str,
        qemu_version: str,
        images: Callable[[], list[str]],
        migration_address: str = "127.0.0.1",
        backup_dir: Path | None = None,
        known_hosts: KnownHosts | None = None,
        transfer_dir: Path | None = None,
        ovmf: Path | None = None,
        revoked: Revoked | None = None,
    ) -> None:
        self.host = host
        self.driver = driver
        self.disks = disks
        self.accelerator = accelerator
        self.accelerator_reason = accelerator_reason
        self.qemu_version = qemu_version
        self.images = images
        self.migration_address = migration_address  # where this host listens for incoming migrations
        self.backup_dir = backup_dir or disks.disks_dir.parent / "backups"  # KASOU_BACKUP_DIR
        # the files to import and the OVAs exported (KASOU_TRANSFER_DIR; kasou.agent.transfers)
        self.transfer_dir = transfer_dir or disks.disks_dir.parent / "transfer"
        self.transfers = Transfers(Sources(self.transfer_dir, host), disks, accelerator)
        # the cluster's host registry (names and addresses): a peer without kasou's marker must name one
        self.known_hosts: KnownHosts = known_hosts or _no_hosts
        self.revoked = revoked  # the revoked certificates' serials (kasou.control.revocation): refused as peers
        self.firmware = FirmwareState(disks, ovmf or ovmf_dir())  # UEFI variables and TPMs (kasou.agent.firmware)
        self.run_id = uuid.uuid4().hex  # this run of the agent (HostInfo.agent_run)
        self.started_empty = False  # set at start: no VM was running here (the host booted)

    def private_dirs(self) -> list[Path]:
        """The directories that hold guests' data: disks, shared storage, the pools it knows, backups."""
        dirs = [self.disks.disks_dir, self.disks.shared_dir, *self.disks.pools.roots(), self.backup_dir]
        return [d for d in dirs if d is not None]

    def make_private(self) -> None:
        """Each of its directories private (0700, 0711 with QEMU confined): one that let others in further is
        fixed and logged; one that cannot be fixed is an error (the agent does not start)."""
        for d in self.private_dirs():
            if d.is_dir() and (old := make_private(d)) is not None:
                log.warning(
                    "%s was mode %s: made it %s (guests' disks and backups are root's only)",
                    d, oct(old), oct(stat.S_IMODE(d.stat().st_mode)),
                )  # fmt: skip

    async def host_info(self) -> HostInfo:
        total, avail = memory_mib()
        running = [v for v in await self.driver.list() if v.state not in (RuntimeState.EXITED, RuntimeState.CRASHED)]
        return HostInfo(
            name=self.host,
            cpus=cpu_count(),
            memory_total_mib=total,
            memory_available_mib=avail,
            load_1m=round(load_1m(), 2),
            accelerator=self.accelerator,
            accelerator_reason=self.accelerator_reason,
            qemu_version=self.qemu_version,
            agent_version=__version__,
            vms_running=len(running),
            agent_run=self.run_id,
            started_empty=self.started_empty,
        )


async def _no_hosts() -> list[str]:
    return []


def create_agent_app(agent: Agent) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        umask = os.umask(PRIVATE_UMASK)  # every mode: what it, QEMU and qemu-img make is root's only
        try:
            agent.make_private()
            with contextlib.suppress(OSError):
                agent.transfer_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            await agent.driver.attach_all()
            alive = (RuntimeState.EXITED, RuntimeState.CRASHED)
            agent.started_empty = not [v for v in await agent.driver.list() if v.state not in alive]
            try:
                yield
            finally:
                await agent.transfers.close()  # a conversion under way is ended and its file removed
                # The VMs keep running: the agent only stops watching them.
                await agent.driver.close()
        finally:
            os.umask(umask)

    app = FastAPI(title="kasou host agent", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(KasouPeers, known_hosts=agent.known_hosts, revoked=agent.revoked)  # over TLS: kasou hosts only
    d = agent.driver

    @app.get("/agent/v1/host")
    async def host() -> HostInfo:
        return await agent.host_info()

    @app.get("/agent/v1/images")
    async def images() -> list[str]:
        return agent.images()

    @app.get("/agent/v1/images/{image}")
    async def image_info(image: str) -> dict[str, int | str]:
        """An image's disk: its virtual size and what its file holds (a new disk's size, and its start)."""
        from kasou.image import load_image

        art = load_image(agent.disks.images_dir, image)
        held = art.disk.stat().st_blocks * 512
        return {
            "name": image,
            "disk_size_bytes": art.disk_size_bytes,
            "allocated_bytes": held,
            "min_memory_mib": art.min_memory_mib,
            "kind": art.kind,
        }

    @app.get("/agent/v1/vms")
    async def list_vms() -> list[RuntimeInfo]:
        return await d.list()

    @app.get("/agent/v1/vms/{name}")
    async def get_vm(name: str) -> RuntimeInfo:
        info = await d.info(name)
        if info is None:
            raise NotFound(f"VM {name!r} is unknown on host {agent.host}")
        return info

    @app.post("/agent/v1/vms/{name}/start")
    async def start(name: str, spec: LaunchSpec) -> RuntimeInfo:
        if spec.name != name:
            raise NotFound(f"spec is for {spec.name!r}, not {name!r}")
        return await d.start(spec)

    async def _act(name: str, op: Callable[[str], Any]) -> RuntimeInfo:
        await op(name)
        info = await d.info(name)
        assert info is not None
        return info

    @app.post("/agent/v1/vms/{name}/powerdown")
    async def powerdown(name: str) -> RuntimeInfo:
        return await _act(name, d.powerdown)

    @app.post("/agent/v1/vms/{name}/guest-shutdown")
    async def guest_shutdown(name: str) -> RuntimeInfo:
        """Ask the guest's agent to shut the guest down (409 when no guest agent answers)."""
        return await _act(name, d.guest_shutdown)

    @app.post("/agent/v1/vms/{name}/guest/exec")
    async def guest_exec(name: str, req: GuestExecRequest) -> GuestExec:
        """Run a command in the guest through its agent and wait for it (409 when no guest agent answers)."""
        return await d.guest_exec(name, req.argv, req.timeout_s)

    @app.post("/agent/v1/vms/{name}/stop")
    async def stop(name: str) -> RuntimeInfo:
        return await _act(name, d.stop)

    @app.post("/agent/v1/vms/{name}/reset")
    async def reset(name: str) -> RuntimeInfo:
        return await _act(name, d.reset)

    @app.post("/agent/v1/vms/{name}/pause")
    async def pause(name: str) -> RuntimeInfo:
        return await _act(name, d.pause)

    @app.post("/agent/v1/vms/{name}/resume")
    async def resume(name: str) -> RuntimeInfo:
        return await _act(name, d.resume)

    @app.post("/agent/v1/vms/{name}/media")
    async def change_medium(name: str, req: MediaChange) -> RuntimeInfo:
        """Put an ISO image of this host in the running VM's CD drive, or empty it (``iso`` null)."""
        return await _act(name, lambda n: d.change_medium(n, req.iso))

    @app.delete("/agent/v1/vms/{name}")
    async def forget(name: str) -> dict[str, bool]:
        await d.forget(name)
        return {"ok": True}

    @app.get("/agent/v1/vms/{name}/console", response_class=PlainTextResponse)
    async def console(
        name: str, max_bytes: int = Query(65536, ge=1, le=16 * 1024 * 1024), uuid: str | None = Query(None)
    ) -> str:
        """The VM's serial console log; with ``uuid``, only if the VM of that uuid wrote it."""
        return await d.console_log(name, max_bytes, uuid)

    # -- live migration (the control plane runs the steps; see Driver) ---------------

    @app.post("/agent/v1/vms/{name}/incoming")
    async def prepare_incoming(name: str, req: IncomingRequest) -> IncomingInfo:
        if req.spec.name != name:
            raise NotFound(f"spec is for {req.spec.name!r}, not {name!r}")
        makes = [d.path for d in req.spec.disks] if req.storage == "copy" else []
        makes += [p for p in (req.spec.nvram if req.storage == "copy" else None, req.spec.tpm_state) if p]
        for path in makes:  # its disk directory, or a pool the control plane told it of
            if not agent.disks.is_disk_path(path):
                raise InvalidSpec(f"{path} is not a disk path of host {agent.host}", field="disks")
        return await d.prepare_incoming(req.spec, req.storage, req.listen_host or agent.migration_address)

    @app.post("/agent/v1/vms/{name}/migrate")
    async def migrate_out(name: str, req: MigrateRequest) -> MigrationStatus:
        await d.migrate_out(name, req.incoming, req.downtime_ms, req.auto_converge, req.bandwidth_mib_s)
        return await d.migration_status(name)

    @app.get("/agent/v1/vms/{name}/migration")
    async def migration_status(name: str) -> MigrationStatus:
        return await d.migration_status(name)

    @app.post("/agent/v1/vms/{name}/incoming/finish")
    async def finish_incoming(name: str) -> RuntimeInfo:
        return await d.finish_incoming(name)

    @app.post("/agent/v1/vms/{name}/migrate/finish")
    async def finish_out(name: str) -> dict[str, bool]:
        await d.finish_out(name)
        return {"ok": True}

    @app.post("/agent/v1/vms/{name}/migrate/abort")
    async def abort_out(name: str, req: AbortRequest | None = None) -> RuntimeInfo:
        await d.abort_out(name, force=req.force if req is not None else False)
        info = await d.info(name)
        if info is None:
            raise NotFound(f"VM {name!r} is unknown on host {agent.host}")
        return info

    @app.post("/agent/v1/vms/{name}/incoming/abort")
    async def abort_incoming(name: str) -> dict[str, bool]:
        await d.abort_incoming(name)
        return {"ok": True}

    # -- disk replication: this host keeps replicas of other hosts' disks ... -------------

    replicas = Replicas(agent.disks.disks_dir, d.replica_exports(), agent.migration_address)

    @app.post("/agent/v1/replicas")
    async def create_replica(req: ReplicaCreate) -> ReplicaTarget:
        return await replicas.create(req)

    @app.get("/agent/v1/replicas")
    async def list_replicas() -> list[ReplicaInfo]:
        return await replicas.list()

    @app.delete("/agent/v1/replicas/{vm}")
    async def delete_replica(vm: str, keep_file: bool = False) -> ReplicaRemoval:
        return await replicas.delete(vm, keep_file=keep_file)

    @app.post("/agent/v1/replicas/{vm}/promote")
    async def promote_replica(vm: str) -> ReplicaPromotion:
        return await replicas.promote(vm)

    # -- ... and mirrors its own VMs' disks into replicas on other hosts (see Driver) -----

    @app.post("/agent/v1/vms/{name}/replicas")
    async def attach_replica(name: str, req: ReplicaAttach) -> ReplicaStatus:
        return await d.attach_replica(name, req.disk_id, req.nbd_host, req.nbd_port, req.export, req.timeout_s)

    @app.get("/agent/v1/vms/{name}/replicas")
    async def replica_status(name: str) -> list[ReplicaStatus]:
        return await d.replica_status(name)

    @app.delete("/agent/v1/vms/{name}/replicas/{disk_id}")
    async def detach_replica(name: str, disk_id: str) -> dict[str, bool]:
        await d.detach_replica(name, disk_id)
        return {"ok": True}

    # -- snapshots: external qcow2 overlays (kasou.agent.snapshots) --------------------------

    snaps = AgentSnapshots(d, agent.disks)

    @app.post("/agent/v1/vms/{name}/snapshots")
    async def take_snapshot(name: str, req: SnapshotTake) -> SnapshotTaken:
        return await snaps.take(name, req)

    @app.post("/agent/v1/vms/{name}/snapshots/merge")
    async def merge_snapshot(name: str, req: SnapshotMerge) -> SnapshotMerged:
        return await snaps.merge(name, req)

    @app.post("/agent/v1/vms/{name}/snapshots/revert")
    async def revert_snapshot(name: str, req: SnapshotRevert) -> dict[str, bool]:
        await snaps.revert(name, req)
        return {"ok": True}

    @app.post("/agent/v1/vms/{name}/restore")
    async def restore(name: str, req: SnapshotRestore) -> RuntimeInfo:
        return await snaps.restore(name, req)

    add_backup_routes(app, BackupFiles(d, agent.disks, agent.backup_dir))  # kasou.agent.backups
    add_firmware_routes(app, agent.firmware, agent.backup_dir)  # kasou.agent.firmware
    add_offsite_routes(app, Offsite(agent.disks, agent.backup_dir))  # copies on a backup server: kasou.agent.offsite
    add_console_routes(app, d)  # the VNC display as a websocket (kasou.agent.console)
    add_transfer_routes(app, agent.transfers)  # imports and exports (kasou.agent.transfers)

    # -- storage pools and mirrored disks ---------------------------------------------------

    @app.post("/agent/v1/pools/usage")
    async def pool_usage(refs: list[PoolRef]) -> list[PoolUsage]:
        """Register these pools (their directories become disk directories here) and measure each."""
        agent.disks.pools.register(refs)
        return [await asyncio.to_thread(pools.usage, r.name, agent.disks.pools.path_of(r)) for r in refs]

    @app.delete("/agent/v1/pools/{pool}")
    async def forget_pool(pool: str) -> dict[str, bool]:
        agent.disks.pools.forget(pool)
        return {"ok": True}

    @app.post("/agent/v1/vms/{name}/mirrors")
    async def attach_mirror(name: str, req: MirrorAttach) -> MirrorStatus:
        agent.disks.check_disk_path(req.target)
        return await d.attach_mirror(name, req.disk_id, req.target, req.sync)

    @app.get("/agent/v1/vms/{name}/mirrors")
    async def mirror_status(name: str) -> list[MirrorStatus]:
        return await d.mirror_status(name)

    @app.delete("/agent/v1/vms/{name}/mirrors/{disk_id}")
    async def detach_mirror(name: str, disk_id: str) -> dict[str, bool]:
        await d.detach_mirror(name, disk_id)
        return {"ok": True}

    @app.post("/agent/v1/disks")
    async def create_disk(req: DiskCreate) -> DiskInfo:
        return await agent.disks.create(req)

    @app.get("/agent/v1/disks/info")
    async def disk_info(path: str) -> DiskInfo:
        return await agent.disks.info(path)

    @app.post("/agent/v1/disks/delete")
    async def delete_disk(body: dict[str, str]) -> dict[str, bool]:
        path = body.get("path", "")
        agent.disks.check_disk_path(path)
        await agent.transfers.cancel_target(path)  # an import still making it stops first
        return {"existed": await agent.disks.delete(path)}

    add_device_routes(app, d, agent.disks)  # disks grown, disks and NICs plugged in and out (kasou.agent.devices)

    @app.get("/agent/v1/stats")
    async def stats() -> StatsReport:
        """This host's CPU, load and memory, and the counters of every VM running here."""
        return StatsReport(host=host_stats(agent.host), vms=await d.stats())

    @app.get("/agent/v1/ping")
    async def ping() -> dict[str, str]:
        await asyncio.sleep(0)
        return {"host": agent.host}

    return app
