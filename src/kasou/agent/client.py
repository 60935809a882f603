"""The control plane's client of a host agent (async httpx, bounded calls)."""

from __future__ import annotations

import builtins
import ssl
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
from httpx_ws import AsyncWebSocketSession, aconnect_ws

from kasou.agent.hostinfo import HostInfo
from kasou.agent.models import (
    BackupCreate,
    BackupMade,
    BackupPrune,
    BackupRestore,
    BackupSend,
    BackupSent,
    DiskCreate,
    DiskImport,
    DiskInfo,
    ExportCreate,
    FirmwareCreate,
    FirmwareFiles,
    GuestConvert,
    MediaChange,
    OffsiteFile,
    OffsiteRestore,
    TpmRestore,
    TransferStatus,
)
from kasou.agent.pools import PoolRef, PoolUsage
from kasou.agent.replicas import ReplicaCreate, ReplicaInfo, ReplicaPromotion, ReplicaRemoval
from kasou.errors import AgentUnavailable, OperationTimeout
from kasou.hypervisor.base import (
    AbortRequest,
    GuestExec,
    GuestExecRequest,
    IncomingInfo,
    IncomingRequest,
    LaunchDisk,
    LaunchSpec,
    MigrateRequest,
    MigrationStatus,
    MigrationStorage,
    MirrorAttach,
    MirrorStatus,
    ReplicaAttach,
    ReplicaStatus,
    ReplicaTarget,
    RuntimeInfo,
)
from kasou.hypervisor.snapshots import (
    SnapshotMerge,
    SnapshotMerged,
    SnapshotRestore,
    SnapshotRevert,
    SnapshotTake,
    SnapshotTaken,
)
from kasou.hypervisor.stats import StatsReport
from kasou.model.imports import ImportInspect, ImportSource
from kasou.model.spec import NicSpec
from kasou.wire import raise_for_response

DEFAULT_TIMEOUT = 30.0


class AgentClient:
    """Talks to the agent of one host, over a unix socket or TCP."""

    def __init__(
        self,
        host: str,
        *,
        uds: str | None = None,
        base_url: str = "http://agent",
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``verify``: for an agent on TCP (https), a context that trusts the site CA and presents this
        host's certificate (:func:`kasou.pki.host_client_context`); the agent refuses callers without one."""
        self.host = host
        if transport is None and uds is not None:
            transport = httpx.AsyncHTTPTransport(uds=uds)
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=DEFAULT_TIMEOUT, verify=verify)

    async def _call(self, method: str, path: str, timeout: float = DEFAULT_TIMEOUT, **kw: Any) -> httpx.Response:
        try:
            resp = await self._http.request(method, "/agent/v1" + path, timeout=timeout, **kw)
        except httpx.TimeoutException:
            raise OperationTimeout(f"the agent of host {self.host} gave no answer in {timeout:.0f} s") from None
        except httpx.TransportError as e:
            raise AgentUnavailable(f"the agent of host {self.host} is not reachable: {e}") from None
        raise_for_response(resp)
        return resp

    async def host_info(self) -> HostInfo:
        return HostInfo.model_validate((await self._call("GET", "/host")).json())

    async def images(self) -> list[str]:
        return list((await self._call("GET", "/images")).json())

    async def list(self) -> list[RuntimeInfo]:
        return [RuntimeInfo.model_validate(x) for x in (await self._call("GET", "/vms")).json()]

    async def info(self, name: str) -> RuntimeInfo:
        return RuntimeInfo.model_validate((await self._call("GET", f"/vms/{name}")).json())

    async def start(self, spec: LaunchSpec) -> RuntimeInfo:
        resp = await self._call("POST", f"/vms/{spec.name}/start", timeout=90, json=spec.model_dump())
        return RuntimeInfo.model_validate(resp.json())

    async def action(self, name: str, action: str) -> RuntimeInfo:
        """One of powerdown, guest-shutdown, stop, reset, pause, resume."""
        resp = await self._call("POST", f"/vms/{name}/{action}", timeout=60)
        return RuntimeInfo.model_validate(resp.json())

    async def change_medium(self, name: str, iso: str | None) -> RuntimeInfo:
        """Put ISO image ``iso`` of this host in running VM ``name``'s CD drive; None empties it."""
        resp = await self._call("POST", f"/vms/{name}/media", timeout=60, json=MediaChange(iso=iso).model_dump())
        return RuntimeInfo.model_validate(resp.json())

    async def forget(self, name: str) -> None:
        await self._call("DELETE", f"/vms/{name}")

    async def console(self, name: str, max_bytes: int = 65536, uuid: str | None = None) -> str:
        params: dict[str, str | int] = {"max_bytes": max_bytes}
        if uuid is not None:
            params["uuid"] = uuid
        return (await self._call("GET", f"/vms/{name}/console", params=params)).text

    # -- live migration: each a bounded step; see the Driver's methods of the same names --

    async def prepare_incoming(
        self, spec: LaunchSpec, storage: MigrationStorage = "shared", listen_host: str | None = None
    ) -> IncomingInfo:
        """On the destination; with copy storage this makes the (empty) disks first."""
        body = IncomingRequest(spec=spec, storage=storage, listen_host=listen_host)
        resp = await self._call("POST", f"/vms/{spec.name}/incoming", timeout=300, json=body.model_dump())
        return IncomingInfo.model_validate(resp.json())

    async def migrate_out(
        self,
        name: str,
        incoming: IncomingInfo,
        downtime_ms: int = 100,
        auto_converge: bool = True,
        bandwidth_mib_s: int | None = None,
    ) -> MigrationStatus:
        """On the source; returns once the migration started (its first status)."""
        body = MigrateRequest(
            incoming=incoming,
            downtime_ms=downtime_ms,
            auto_converge=auto_converge,
            bandwidth_mib_s=bandwidth_mib_s,
        )
        resp = await self._call("POST", f"/vms/{name}/migrate", timeout=60, json=body.model_dump())
        return MigrationStatus.model_validate(resp.json())

    async def migration_status(self, name: str) -> MigrationStatus:
        resp = await self._call("GET", f"/vms/{name}/migration", timeout=60)
        return MigrationStatus.model_validate(resp.json())

    async def finish_incoming(self, name: str) -> RuntimeInfo:
        resp = await self._call("POST", f"/vms/{name}/incoming/finish", timeout=60)
        return RuntimeInfo.model_validate(resp.json())

    async def finish_out(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/migrate/finish", timeout=60)

    async def abort_out(self, name: str, force: bool = False) -> RuntimeInfo:
        """On the source: the VM goes on running there (see Driver.abort_out for ``force``)."""
        body = AbortRequest(force=force)
        resp = await self._call("POST", f"/vms/{name}/migrate/abort", timeout=60, json=body.model_dump())
        return RuntimeInfo.model_validate(resp.json())

    async def abort_incoming(self, name: str) -> None:
        await self._call("POST", f"/vms/{name}/incoming/abort", timeout=60)

    # -- disk replication: the replica side (this host keeps a replica of another host's disk) --

    async def create_replica(
        self,
        vm: str,
        disk_id: str,
        size_bytes: int,
        listen_host: str | None = None,
        writethrough: bool = False,
    ) -> ReplicaTarget:
        """Make an empty replica of ``size_bytes`` here and serve it over NBD (idempotent)."""
        body = ReplicaCreate(
            vm=vm, disk_id=disk_id, size_bytes=size_bytes, listen_host=listen_host, writethrough=writethrough
        )
        resp = await self._call("POST", "/replicas", timeout=180, json=body.model_dump())
        return ReplicaTarget.model_validate(resp.json())

    async def list_replicas(self) -> builtins.list[ReplicaInfo]:
        return [ReplicaInfo.model_validate(x) for x in (await self._call("GET", "/replicas")).json()]

    async def delete_replica(self, vm: str, keep_file: bool = False) -> ReplicaRemoval:
        """Stop serving every replica of ``vm`` here and delete (or keep) their files; idempotent."""
        resp = await self._call("DELETE", f"/replicas/{vm}", timeout=60, params={"keep_file": keep_file})
        return ReplicaRemoval.model_validate(resp.json())

    async def promote_replica(self, vm: str) -> ReplicaPromotion:
        """Stop serving ``vm``'s replicas here; returns the files (by disk id) to start the VM from."""
        resp = await self._call("POST", f"/replicas/{vm}/promote", timeout=60)
        return ReplicaPromotion.model_validate(resp.json())

    # -- disk replication: the VM's side (this host runs the VM and mirrors its disk) ----------

    async def attach_replica(self, name: str, target: ReplicaTarget, timeout_s: float = 60.0) -> ReplicaStatus:
        """Mirror the disk into ``target``; waits up to ``timeout_s`` (0: not at all) until in sync."""
        body = ReplicaAttach(
            disk_id=target.disk_id,
            nbd_host=target.nbd_host,
            nbd_port=target.nbd_port,
            export=target.export,
            timeout_s=timeout_s,
        )
        resp = await self._call("POST", f"/vms/{name}/replicas", timeout=timeout_s + 60, json=body.model_dump())
        return ReplicaStatus.model_validate(resp.json())

    async def replica_status(self, name: str) -> builtins.list[ReplicaStatus]:
        resp = await self._call("GET", f"/vms/{name}/replicas")
        return [ReplicaStatus.model_validate(x) for x in resp.json()]

    async def detach_replica(self, name: str, disk_id: str) -> None:
        await self._call("DELETE", f"/vms/{name}/replicas/{disk_id}", timeout=60)

    # -- snapshots (kasou.agent.snapshots): the VM's own host, running or stopped ----------------

    async def take_snapshot(self, name: str, req: SnapshotTake) -> SnapshotTaken:
        resp = await self._call("POST", f"/vms/{name}/snapshots", timeout=720, json=req.model_dump())
        return SnapshotTaken.model_validate(resp.json())

    async def merge_snapshot(self, name: str, req: SnapshotMerge) -> SnapshotMerged:
        resp = await self._call(
            "POST", f"/vms/{name}/snapshots/merge", timeout=req.timeout_s + 60, json=req.model_dump()
        )
        return SnapshotMerged.model_validate(resp.json())

    async def revert_snapshot(self, name: str, req: SnapshotRevert) -> None:
        await self._call("POST", f"/vms/{name}/snapshots/revert", timeout=120, json=req.model_dump())

    async def restore(self, name: str, spec: LaunchSpec, state_path: str) -> RuntimeInfo:
        body = SnapshotRestore(spec=spec.model_dump(), state_path=state_path)
        resp = await self._call("POST", f"/vms/{name}/restore", timeout=720, json=body.model_dump())
        return RuntimeInfo.model_validate(resp.json())

    # -- backups (kasou.agent.backups): long ones get the backup's own time limit ---------------

    async def create_backup(self, name: str, req: BackupCreate) -> BackupMade:
        resp = await self._call("POST", f"/vms/{name}/backups", timeout=req.timeout_s + 600, json=req.model_dump())
        return BackupMade.model_validate(resp.json())

    async def verify_backup(self, path: str, digest: str) -> None:
        await self._call("POST", "/backups/verify", timeout=1800, json={"path": path, "digest": digest})

    async def restore_backup(self, req: BackupRestore) -> DiskInfo:
        resp = await self._call("POST", "/backups/restore", timeout=3600, json=req.model_dump())
        return DiskInfo.model_validate(resp.json())

    async def restore_tpm_backup(self, req: TpmRestore) -> FirmwareFiles:
        resp = await self._call("POST", "/backups/restore-tpm", timeout=120, json=req.model_dump())
        return FirmwareFiles.model_validate(resp.json())

    async def guest_exec(self, name: str, argv: builtins.list[str], timeout_s: float = 60.0) -> GuestExec:
        """Run a command in the VM's guest through its guest agent; its exit code and output."""
        body = GuestExecRequest(argv=argv, timeout_s=timeout_s)
        resp = await self._call("POST", f"/vms/{name}/guest/exec", timeout=timeout_s + 30, json=body.model_dump())
        return GuestExec.model_validate(resp.json())

    async def send_backup(self, name: str, req: BackupSend) -> BackupSent:
        """Copy a generation of this host to a backup server (kasou.agent.offsite)."""
        resp = await self._call("POST", f"/vms/{name}/backups/send", timeout=86_400, json=req.model_dump())
        return BackupSent.model_validate(resp.json())

    async def restore_offsite(self, req: OffsiteRestore) -> DiskInfo:
        resp = await self._call("POST", "/backups/offsite/restore", timeout=86_400, json=req.model_dump())
        return DiskInfo.model_validate(resp.json())

    async def offsite_file(self, req: OffsiteFile) -> bytes:
        """One file of a backup server's generation, read on this host."""
        return (await self._call("POST", "/backups/offsite/file", timeout=86_400, json=req.model_dump())).content

    async def restore_offsite_tpm(self, req: OffsiteRestore) -> FirmwareFiles:
        resp = await self._call("POST", "/backups/offsite/restore-tpm", timeout=600, json=req.model_dump())
        return FirmwareFiles.model_validate(resp.json())

    async def prune_backup(self, req: BackupPrune) -> None:
        await self._call("POST", "/backups/prune", timeout=3600, json=req.model_dump())

    async def delete_backup(self, path: str) -> bool:
        return bool((await self._call("POST", "/backups/delete", json={"path": path})).json()["existed"])

    async def image_info(self, image: str) -> dict[str, Any]:
        data: dict[str, Any] = (await self._call("GET", f"/images/{image}")).json()
        return data

    async def pool_usage(self, refs: builtins.list[PoolRef]) -> builtins.list[PoolUsage]:
        resp = await self._call("POST", "/pools/usage", timeout=60, json=[r.model_dump() for r in refs])
        return [PoolUsage.model_validate(u) for u in resp.json()]

    async def forget_pool(self, pool: str) -> None:
        await self._call("DELETE", f"/pools/{pool}")

    async def attach_mirror(self, name: str, req: MirrorAttach) -> MirrorStatus:
        resp = await self._call("POST", f"/vms/{name}/mirrors", timeout=60, json=req.model_dump())
        return MirrorStatus.model_validate(resp.json())

    async def mirror_status(self, name: str) -> builtins.list[MirrorStatus]:
        return [MirrorStatus.model_validate(m) for m in (await self._call("GET", f"/vms/{name}/mirrors")).json()]

    async def detach_mirror(self, name: str, disk_id: str) -> None:
        await self._call("DELETE", f"/vms/{name}/mirrors/{disk_id}", timeout=30)

    async def create_disk(self, req: DiskCreate) -> DiskInfo:
        resp = await self._call("POST", "/disks", timeout=660, json=req.model_dump())
        return DiskInfo.model_validate(resp.json())

    # -- devices that change (kasou.agent.devices) ------------------------------------------------

    async def grow_disk(self, name: str, disk_id: str, size_bytes: int) -> None:
        """Grow a disk of running VM ``name`` (QMP block_resize)."""
        await self._call("POST", f"/vms/{name}/disks/{disk_id}/grow", timeout=60, json={"size_bytes": size_bytes})

    async def grow_file(self, path: str, size_bytes: int) -> DiskInfo:
        """Grow a disk file of a stopped VM (qemu-img resize)."""
        resp = await self._call("POST", "/disks/grow", timeout=90, json={"size_bytes": size_bytes, "path": path})
        return DiskInfo.model_validate(resp.json())

    async def plug_disk(self, name: str, disk: LaunchDisk) -> None:
        await self._call("POST", f"/vms/{name}/disks", timeout=60, json=disk.model_dump())

    async def unplug_disk(self, name: str, disk_id: str, timeout_s: float = 30.0) -> None:
        params = {"timeout_s": timeout_s}
        await self._call("DELETE", f"/vms/{name}/disks/{disk_id}", timeout=timeout_s + 30, params=params)

    async def plug_nic(self, name: str, nic: NicSpec) -> None:
        await self._call("POST", f"/vms/{name}/nics", timeout=60, json=nic.model_dump())

    async def unplug_nic(self, name: str, nic_id: str, timeout_s: float = 30.0) -> None:
        params = {"timeout_s": timeout_s}
        await self._call("DELETE", f"/vms/{name}/nics/{nic_id}", timeout=timeout_s + 30, params=params)

    async def create_firmware(self, req: FirmwareCreate) -> FirmwareFiles:
        """A new VM's UEFI variable store and TPM (kasou.agent.firmware); making a TPM takes about a second."""
        return FirmwareFiles.model_validate(
            (await self._call("POST", "/firmware", timeout=120, json=req.model_dump())).json()
        )

    async def disk_info(self, path: str) -> DiskInfo:
        return DiskInfo.model_validate((await self._call("GET", "/disks/info", params={"path": path})).json())

    async def delete_disk(self, path: str) -> bool:
        return bool((await self._call("POST", "/disks/delete", json={"path": path})).json()["existed"])

    # -- imports and exports (kasou.agent.transfers): started here, followed by polling -------------

    async def inspect_import(self, req: ImportInspect) -> ImportSource:
        """What the host finds in the files to import (reads an OVA's members, qemu-img info of each disk)."""
        resp = await self._call("POST", "/transfers/inspect", timeout=300, json=req.model_dump())
        return ImportSource.model_validate(resp.json())

    async def start_import(self, req: DiskImport) -> TransferStatus:
        resp = await self._call("POST", "/transfers/imports", timeout=60, json=req.model_dump())
        return TransferStatus.model_validate(resp.json())

    async def start_convert(self, req: GuestConvert) -> TransferStatus:
        """Run virt-v2v in place on a new VM's disks (``vm import --convert``); followed like an import."""
        resp = await self._call("POST", "/transfers/conversions", timeout=60, json=req.model_dump())
        return TransferStatus.model_validate(resp.json())

    async def start_export(self, req: ExportCreate) -> TransferStatus:
        resp = await self._call("POST", "/transfers/exports", timeout=60, json=req.model_dump())
        return TransferStatus.model_validate(resp.json())

    async def transfer(self, task_id: str, wait_s: float = 0.0) -> TransferStatus:
        """A transfer's status; with ``wait_s`` (at most 10), as soon as it ends or after that long."""
        resp = await self._call("GET", f"/transfers/{task_id}", params={"wait_s": wait_s}, timeout=wait_s + 30)
        return TransferStatus.model_validate(resp.json())

    async def cancel_transfer(self, task_id: str) -> TransferStatus:
        """End a transfer (removing what it made unless it succeeded) and forget it."""
        resp = await self._call("DELETE", f"/transfers/{task_id}", timeout=60)
        return TransferStatus.model_validate(resp.json())

    async def stats(self, timeout: float = 10.0) -> StatsReport:
        return StatsReport.model_validate((await self._call("GET", "/stats", timeout=timeout)).json())

    def vnc(self, name: str) -> AbstractAsyncContextManager[AsyncWebSocketSession]:
        """The VM's VNC display as a websocket (kasou.agent.console); the caller bounds the connect."""
        return aconnect_ws(f"/agent/v1/vms/{name}/vnc", self._http, max_message_size_bytes=1024 * 1024)

    def serial(self, name: str) -> AbstractAsyncContextManager[AsyncWebSocketSession]:
        """The VM's serial console as a websocket (kasou.agent.console); the caller bounds the connect."""
        return aconnect_ws(f"/agent/v1/vms/{name}/serial", self._http, max_message_size_bytes=1024 * 1024)

    async def ping(self, timeout: float = 5.0) -> bool:
        try:
            await self._call("GET", "/ping", timeout=timeout)
            return True
        except (AgentUnavailable, OperationTimeout):
            return False

    async def close(self) -> None:
        await self._http.aclose()
