"""The driver interface every hypervisor backend implements (QEMU; the tests' fake in ``tests/doubles``).

Modelled on Nova's virt driver boundary: the agent asks for VMs by name with a
:class:`LaunchSpec` and gets back :class:`RuntimeInfo`; how the backend does it
(command lines, monitors, pids) never leaves the driver. What the docstrings below promise is
checked against both the QEMU driver and the fake by one contract suite
(``tests/contract/test_driver_contract.py``).
"""

from __future__ import annotations

import abc
import builtins
import re
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kasou.errors import HypervisorError, InvalidSpec, WrongState
from kasou.hypervisor.backups import BackupDisk, BackupDiskResult
from kasou.hypervisor.snapshots import SnapshotMerge, SnapshotMerged, SnapshotTake, SnapshotTaken
from kasou.hypervisor.stats import VmStats
from kasou.model.cloudinit import CloudInit
from kasou.model.firmware import Firmware, GuestOs
from kasou.model.media import BootDevice
from kasou.model.spec import NicSpec


class LaunchDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    path: str
    format: str = "qcow2"
    readonly: bool = False
    size_bytes: int | None = Field(default=None, gt=0)  # virtual size; needed to make the copy of a migrating disk
    mirror: str | None = None  # RAID-1: the second copy (a qcow2 of the same size in another pool), kept in sync
    mirror_sync: Literal["none", "full"] = "full"  # none: both copies are known equal (a clean stop in sync)
    # A mirrored disk's device pauses the VM on an I/O error (the driver then switches to the other copy):
    # implied by ``mirror``; set alone for a mirrored disk that starts without its second copy yet (the
    # destination of a live migration, which gets a new one once it runs).
    stop_on_error: bool = False
    port: int | None = None  # on hot-plug root port N (kasou.hypervisor.qemu.hotplug); None: the root bus


class LaunchSpec(BaseModel):
    """Everything a host needs to run one VM; sent by the control plane to an agent."""

    model_config = ConfigDict(extra="forbid")

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    image: str | None = None  # boot kernel and initramfs of this image; None: firmware boots the disk
    cpu: str | None = None  # kasou's CPU model name (kasou.model.machine); None: QEMU's default
    machine: str = "q35"  # the q35 machine type (a VM is pinned to a versioned one at creation)
    firmware: Firmware = "bios"  # bios, uefi or uefi-secure (kasou.model.firmware)
    nvram: str | None = None  # UEFI: the VM's own variable store (a raw file beside its disks)
    tpm_state: str | None = None  # a TPM 2.0: its state directory (beside the disks); None: no TPM
    os: GuestOs | None = None  # windows: Hyper-V enlightenments, the real-time clock in local time
    kernel_args_extra: str = ""
    cdrom_drive: bool = False  # a CD drive (ide-cd on q35's AHCI; kasou.model.media)
    cdrom: str | None = None  # the ISO image (of this host's image store) in it; None: the drive is empty
    boot: list[BootDevice] | None = None  # the firmware's boot order; None: disk, then CD
    disks: list[LaunchDisk] = []
    nics: list[NicSpec] = []
    paused: bool = False  # start with the vCPUs stopped (-S)
    ha: bool = False  # HA-protected: the host's guard kills it when the host loses its cluster lease
    cloud_init: CloudInit | None = None  # a NoCloud seed disk made at each start (kasou.hypervisor.qemu.seed)
    pci_ports: int = Field(default=0, ge=0, le=32)  # empty PCIe root ports for disks and NICs plugged in later

    @model_validator(mode="after")
    def _uefi_has_vars(self) -> LaunchSpec:
        if (self.firmware != "bios") != (self.nvram is not None):
            raise ValueError("a UEFI VM needs its variable store (nvram), and only a UEFI VM has one")
        if self.cdrom is not None and not self.cdrom_drive:
            raise ValueError("an ISO goes in a CD drive: cdrom needs cdrom_drive")
        return self


class RuntimeState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting_down"  # powerdown asked, guest not gone yet
    EXITED = "exited"  # the process ended on request or by the guest's own power-off
    CRASHED = "crashed"  # the process ended without anyone asking
    INCOMING = "incoming"  # a paused QEMU waiting for (or holding) a migrated VM; never runs the guest


class GuestInfo(BaseModel):
    """What the guest itself says through the QEMU guest agent (``qemu-ga`` in the guest)."""

    agent: bool = False  # its guest agent answers now
    agent_age_s: float | None = None  # seconds since it last answered (None: not since the guest (re)started)
    os: str | None = None
    hostname: str | None = None
    ips: list[str] = []  # its addresses, loopback and link-local left out


class RuntimeInfo(BaseModel):
    """What a host knows of one VM's process, right now."""

    name: str
    state: RuntimeState
    pid: int | None = None
    started_at: float | None = None  # epoch seconds the process started
    accelerator: str | None = None
    guest_ready: bool = False
    guest_uptime_s: float | None = None
    heartbeat_age_s: float | None = None
    exit_reason: str | None = None
    guest: GuestInfo = GuestInfo()


MigrationStorage = Literal["shared", "copy"]


class IncomingInfo(BaseModel):
    """Where a destination host waits for a migrating VM: from ``prepare_incoming`` to ``migrate_out``."""

    model_config = ConfigDict(extra="forbid")

    storage: MigrationStorage = "shared"
    migration_uri: str  # QEMU's migration URI, e.g. tcp:10.0.0.2:49152
    nbd_host: str | None = None  # copy storage: the destination's NBD server
    nbd_port: int | None = None
    exports: dict[str, str] = {}  # disk id -> NBD export name (copy storage)
    tls: bool = False  # the streams are TLS (tls-creds-x509, the site CA): the source must connect with TLS

    @model_validator(mode="after")
    def _copy_needs_nbd(self) -> IncomingInfo:
        if self.storage == "copy" and (self.nbd_host is None or self.nbd_port is None):
            raise ValueError("copy storage needs nbd_host and nbd_port")
        return self


class MigrationStatus(BaseModel):
    """A migration seen from the source (QEMU's ``query-migrate``, plus the disk copy before it).

    ``status`` is QEMU's (``setup``, ``active``, ``device``, ``completed``, ``failed``,
    ``cancelling``, ``cancelled``, ...), ``mirroring`` while the disks are copied
    before the memory, or ``none``. ``completed`` means memory, device state and
    every disk are on the destination and the source is paused for good.
    """

    status: str
    progress: float = 0.0  # 0..1: disk bytes then memory bytes, transferred / total
    downtime_ms: int | None = None  # the guest's pause at the switch-over (once completed)
    total_ms: int | None = None
    setup_ms: int | None = None
    error: str | None = None


class IncomingRequest(BaseModel):
    """Body of the agent's ``POST /vms/{name}/incoming``."""

    model_config = ConfigDict(extra="forbid")

    spec: LaunchSpec
    storage: MigrationStorage = "shared"
    listen_host: str | None = None  # None: the agent's migration address


class MigrateRequest(BaseModel):
    """Body of the agent's ``POST /vms/{name}/migrate``."""

    model_config = ConfigDict(extra="forbid")

    incoming: IncomingInfo
    downtime_ms: int = Field(default=100, ge=1, le=60_000)
    auto_converge: bool = True
    bandwidth_mib_s: int | None = Field(default=None, ge=1)


class AbortRequest(BaseModel):
    """Body of the agent's ``POST /vms/{name}/migrate/abort``."""

    model_config = ConfigDict(extra="forbid")

    force: bool = False


# -- synchronous disk replication ("network RAID-1"; see kasou.hypervisor.qemu.replication) ---------

ReplicaState = Literal["none", "syncing", "in_sync", "degraded"]

#: A disk id that can name QEMU nodes and jobs (``repl-nbd-<id>``: QEMU allows 31 characters) and files.
_DISK_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,21}$")


def validate_disk_id(disk_id: str) -> str:
    if not _DISK_ID_RE.fullmatch(disk_id):
        raise InvalidSpec(
            f"disk id {disk_id!r} must start with a letter and have at most 22 letters, digits, '-' or '_'",
            field="disk_id",
        )
    return disk_id


class ReplicaTarget(BaseModel):
    """Where the replica of one disk is served: an NBD export on the replica's host (its agent made it)."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    disk_id: str
    nbd_host: str
    nbd_port: int = Field(gt=0, lt=65536)
    export: str
    path: str  # the replica file on the replica's host


class ReplicaAttach(BaseModel):
    """Body of the agent's ``POST /vms/{name}/replicas``: mirror one disk of a running VM into a replica."""

    model_config = ConfigDict(extra="forbid")

    disk_id: str
    nbd_host: str
    nbd_port: int = Field(gt=0, lt=65536)
    export: str
    timeout_s: float = Field(default=60.0, ge=0, le=86_400)  # wait this long for "in_sync"; 0: return at once


class ReplicaStatus(BaseModel):
    """The replication of one disk of a running VM, seen from the VM's host.

    ``none``: no replica attached. ``syncing``: the first full copy is under way
    (``progress`` 0..1). ``in_sync``: every guest write is acknowledged only once
    both copies have it. ``degraded``: the replica was attached but is not kept in
    sync any more (its host or daemon is gone, or it stopped answering); the guest
    goes on writing to its local disk. A degraded replica stays so until detached;
    the way back is detach, then attach to a fresh replica (a full copy).
    """

    disk_id: str
    state: ReplicaState
    progress: float = 0.0
    nbd_host: str | None = None
    nbd_port: int | None = None
    export: str | None = None
    since: float | None = None  # epoch seconds the replica was attached
    error: str | None = None


class MirrorStatus(BaseModel):
    """A mirrored disk (RAID-1 on one host) of a running VM: the replicas' status model, with local paths.

    ``none``: no second copy. ``syncing``: the second copy is being filled (``progress``).
    ``in_sync``: every guest write reaches both copies before the guest sees it done.
    ``degraded``: the disk runs on one copy (``error`` says why; ``failed`` is the copy that was
    lost); :meth:`Driver.attach_mirror` gives it a new second copy.
    """

    disk_id: str
    state: ReplicaState
    progress: float = 0.0
    path: str | None = None  # the copy the guest runs on now
    second: str | None = None  # the second copy
    failed: str | None = None
    since: float | None = None
    error: str | None = None


class MirrorAttach(BaseModel):
    """Body of the agent's ``POST /vms/{name}/mirrors``: give a disk of a running VM a (new) second copy."""

    model_config = ConfigDict(extra="forbid")

    disk_id: str
    target: str  # an existing qcow2 of the disk's size (made with the disk API in the second pool)
    sync: Literal["none", "full"] = "full"


class ReplicaExports(abc.ABC):
    """The replica side of replication on one host: replica files exported over NBD by a daemon.

    The daemon outlives the agent (as QEMU does) and is found again from ``path``
    alone. The agent (:mod:`kasou.agent.replicas`) owns the files and their records.
    """

    @abc.abstractmethod
    async def create(self, path: Path, size_bytes: int) -> None:
        """Make an empty qcow2 image of ``size_bytes`` at ``path`` for a replica (bounded; nothing left on failure)."""

    @abc.abstractmethod
    async def start(self, path: Path, export: str, listen_host: str, writethrough: bool) -> int:
        """Serve the image at ``path`` writable as NBD export ``export`` on a free port of ``listen_host``.

        At most one client at a time; the image is locked so no other process opens
        it. Returns the port. On failure nothing runs.
        """

    @abc.abstractmethod
    def alive(self, path: Path) -> bool:
        """True while a daemon serves ``path``."""

    @abc.abstractmethod
    async def stop(self, path: Path) -> None:
        """End the daemon of ``path`` (bounded); nothing happens if none runs."""


class GuestExecRequest(BaseModel):
    """Body of the agent's ``POST /vms/{name}/guest/exec``: a command run inside the guest by its agent."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, max_length=64)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)


class GuestExec(BaseModel):
    exitcode: int  # -1: killed by a signal
    stdout: str  # at most 64 KiB of each, as UTF-8 (undecodable bytes replaced)
    stderr: str
    seconds: float


class Driver(abc.ABC):
    """A hypervisor backend. Every method is bounded in time and raises KasouError subclasses."""

    @abc.abstractmethod
    async def attach_all(self) -> list[str]:
        """Find the VMs this host already runs (after an agent restart) and monitor them again."""

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> RuntimeInfo:
        """Start a VM's process. Never starts a second one for a name that runs; on failure leaves nothing."""

    @abc.abstractmethod
    async def powerdown(self, name: str) -> None:
        """Press the ACPI power button (a graceful shutdown the guest carries out)."""

    async def guest_shutdown(self, name: str) -> None:
        """Ask the guest's agent to shut the guest down (``guest-shutdown``); returns once asked.

        WrongState when no guest agent answers (the caller presses the power button instead).
        """
        raise WrongState(f"{type(self).__name__} cannot reach guest agents")

    async def guest_exec(self, name: str, argv: list[str], timeout_s: float) -> GuestExec:
        """Run ``argv`` in the guest through its agent (``guest-exec``) and wait, at most ``timeout_s``, for it to
        end: its exit code and output. WrongState when no guest agent answers."""
        raise WrongState(f"{type(self).__name__} cannot reach guest agents")

    @abc.abstractmethod
    async def stop(self, name: str) -> None:
        """End the VM's process at once and wait until it is gone."""

    @abc.abstractmethod
    async def reset(self, name: str) -> None:
        """Hard reset of the virtual machine (the process stays)."""

    @abc.abstractmethod
    async def pause(self, name: str) -> None: ...

    @abc.abstractmethod
    async def resume(self, name: str) -> None: ...

    @abc.abstractmethod
    async def info(self, name: str) -> RuntimeInfo | None:
        """The VM's runtime state, or None if this host knows nothing of it."""

    @abc.abstractmethod
    async def list(self) -> list[RuntimeInfo]: ...

    @abc.abstractmethod
    async def forget(self, name: str) -> None:
        """Drop what is remembered of an exited or crashed VM (its runtime files)."""

    @abc.abstractmethod
    async def console_log(self, name: str, max_bytes: int = 65536, uuid: str | None = None) -> str:
        """The tail of the VM's serial console output (it outlives the process and ``forget``); with
        ``uuid``, only if the log was written by the VM of that uuid (NotFound otherwise), so a new VM
        never shows what an earlier VM of the same name left."""

    # -- live migration, in small steps the control plane orchestrates ------------------
    #
    #   destination: prepare_incoming ........................ finish_incoming
    #   source:                    migrate_out, migration_status ...           finish_out
    #
    # Both copies never run at once: the destination stays paused until
    # finish_incoming, which the control plane calls only after the source
    # reported "completed" (the source is then paused for good). Either side
    # can be abandoned with abort_out / abort_incoming before that.

    @abc.abstractmethod
    async def prepare_incoming(self, spec: LaunchSpec, storage: MigrationStorage, listen_host: str) -> IncomingInfo:
        """On the destination: start a paused QEMU that waits for the VM on ``listen_host``.

        With ``storage="copy"`` it first makes each disk of ``spec`` (empty, of
        ``size_bytes``, at the path the spec names; an existing file is refused)
        and exports it writable over NBD for the source to copy into. The VM shows
        state ``incoming`` until finished or aborted. On failure it leaves nothing.
        """

    @abc.abstractmethod
    async def migrate_out(
        self,
        name: str,
        incoming: IncomingInfo,
        downtime_ms: int = 100,
        auto_converge: bool = True,
        bandwidth_mib_s: int | None = None,
    ) -> None:
        """On the source: start sending the VM to ``incoming``; returns once started, not finished.

        Copy storage first mirrors every disk to the destination's exports (status
        ``mirroring``), then sends memory and device state once the copies are in sync.
        """

    @abc.abstractmethod
    async def migration_status(self, name: str) -> MigrationStatus:
        """On the source: how far the migration is (``none`` if there is none)."""

    @abc.abstractmethod
    async def finish_incoming(self, name: str) -> RuntimeInfo:
        """On the destination, after the source reported ``completed``: let the guest run here."""

    @abc.abstractmethod
    async def finish_out(self, name: str) -> None:
        """On the source, after the destination runs: end the paused source QEMU and forget it.

        Refused unless the migration completed. Its disks stay (copy storage: the
        control plane deletes them through the disk API).
        """

    @abc.abstractmethod
    async def abort_out(self, name: str, force: bool = False) -> None:
        """On the source: cancel the migration; the VM goes on running here.

        Once this host reported ``completed``, the destination may already run the
        guest: then it is refused unless ``force`` (the caller knows the destination
        copy is gone, e.g. after ``abort_incoming`` there).
        """

    @abc.abstractmethod
    async def abort_incoming(self, name: str) -> None:
        """On the destination: end the waiting QEMU, its runtime files and the disks it made.

        Refused for a VM that already runs here; nothing happens for an unknown VM.
        """

    # -- synchronous disk replication (optional: a driver without it refuses) -------------
    #
    #   replica host: agent POST /replicas -> replica_exports().start (an NBD export of an empty file)
    #   VM's host:    attach_replica (mirror, write-blocking) ... replica_status ... detach_replica

    async def attach_replica(
        self, name: str, disk_id: str, nbd_host: str, nbd_port: int, export: str, timeout_s: float = 60.0
    ) -> ReplicaStatus:
        """Mirror disk ``disk_id`` of running VM ``name`` into an NBD export, for as long as the VM runs.

        Every guest write is then acknowledged only once the replica has it too.
        Waits (at most ``timeout_s``; 0: not at all) for the first full copy to
        finish, i.e. ``in_sync``. On failure (or timeout) nothing is left attached.
        The same target again is harmless; another target for an attached disk is
        refused (detach first).
        """
        raise HypervisorError(f"{type(self).__name__} cannot replicate disks")

    async def replica_status(self, name: str) -> builtins.list[ReplicaStatus]:
        """The replication state of every disk of running VM ``name``."""
        raise HypervisorError(f"{type(self).__name__} cannot replicate disks")

    async def detach_replica(self, name: str, disk_id: str) -> None:
        """Stop mirroring the disk (bounded, also when the replica hangs); nothing happens if none is attached."""
        raise HypervisorError(f"{type(self).__name__} cannot replicate disks")

    # -- mirrored disks (RAID-1 on one host; optional: a driver without it refuses) --------------

    async def attach_mirror(
        self, name: str, disk_id: str, target: str, sync: Literal["none", "full"] = "full"
    ) -> MirrorStatus:
        """Mirror disk ``disk_id`` of running VM ``name`` into ``target``; returns at once (``syncing``)."""
        raise HypervisorError(f"{type(self).__name__} cannot mirror disks")

    async def mirror_status(self, name: str) -> builtins.list[MirrorStatus]:
        """The mirror state of every disk of running VM ``name``."""
        raise HypervisorError(f"{type(self).__name__} cannot mirror disks")

    async def detach_mirror(self, name: str, disk_id: str) -> None:
        """Stop mirroring the disk and close its second copy; nothing happens if it has none."""
        raise HypervisorError(f"{type(self).__name__} cannot mirror disks")

    def replica_exports(self) -> ReplicaExports | None:
        """How this host serves replicas of other hosts' disks (None: it cannot)."""
        return None

    # -- snapshots of a running VM (external qcow2 overlays; see kasou.hypervisor.snapshots) --------

    async def snapshot(self, name: str, req: SnapshotTake) -> SnapshotTaken:
        """Put an empty overlay on each disk of running VM ``name`` at one instant (and save its memory).

        Overlay and state file paths are the agent's choice (``req``). On failure nothing is left.
        """
        raise HypervisorError(f"{type(self).__name__} cannot take snapshots")

    async def merge_snapshot(self, name: str, req: SnapshotMerge) -> SnapshotMerged:
        """Commit layers of running VM ``name`` into their backing files while the guest runs."""
        raise HypervisorError(f"{type(self).__name__} cannot merge snapshots")

    async def restore(self, spec: LaunchSpec, state_path: str) -> RuntimeInfo:
        """Start a VM from a saved memory state (its disks as they were then); it runs on from that instant."""
        raise HypervisorError(f"{type(self).__name__} cannot restore a memory state")

    # -- backups of a running VM (optional; see kasou.hypervisor.backups) -------------------------

    async def backup_disks(
        self, name: str, backup_id: str, disks: builtins.list[BackupDisk], timeout_s: float = 1800.0
    ) -> builtins.list[BackupDiskResult]:
        """Back up disks of running VM ``name`` at one point in time into new qcow2 files (full or incremental).

        The guest goes on running. On failure no target file, block node, job or new bitmap is left.
        """
        raise HypervisorError(f"{type(self).__name__} cannot back up running VMs")

    # -- devices that change while the guest runs (optional; kasou.hypervisor.qemu.hotplug) ---------

    async def grow_disk(self, name: str, disk_id: str, size_bytes: int) -> None:
        """Grow disk ``disk_id`` of running VM ``name`` to ``size_bytes`` (never smaller); the guest sees it."""
        raise HypervisorError(f"{type(self).__name__} cannot resize disks of running VMs")

    async def plug_disk(self, name: str, disk: LaunchDisk) -> None:
        """Plug ``disk`` (its file exists; ``port`` set) into running VM ``name``. On failure nothing is left."""
        raise HypervisorError(f"{type(self).__name__} cannot plug disks into running VMs")

    async def unplug_disk(self, name: str, disk_id: str, timeout_s: float = 30.0) -> None:
        """Unplug disk ``disk_id`` from running VM ``name`` once its guest lets go of it (OperationTimeout if it
        does not within ``timeout_s``: the disk stays); its file stays."""
        raise HypervisorError(f"{type(self).__name__} cannot unplug disks from running VMs")

    async def plug_nic(self, name: str, nic: NicSpec) -> None:
        """Plug ``nic`` (``port`` set; on a named network: its tap made here first) into running VM ``name``."""
        raise HypervisorError(f"{type(self).__name__} cannot plug NICs into running VMs")

    async def unplug_nic(self, name: str, nic_id: str, timeout_s: float = 30.0) -> None:
        """Unplug NIC ``nic_id`` from running VM ``name`` (and delete its tap), as :meth:`unplug_disk`."""
        raise HypervisorError(f"{type(self).__name__} cannot unplug NICs from running VMs")

    # -- resource figures (optional; see kasou.hypervisor.stats) -----------------------------------

    async def stats(self) -> builtins.list[VmStats]:
        """CPU, memory, disk and network counters of every VM whose guest runs here (bounded)."""
        raise HypervisorError(f"{type(self).__name__} cannot measure VMs")

    # -- the CD drive (optional; kasou.model.media) -------------------------------------------------

    async def change_medium(self, name: str, iso: str | None) -> None:
        """Put the ISO image ``iso`` (of this host's image store) in running VM ``name``'s CD drive, replacing
        what it held, or empty the drive (``iso`` None). The guest sees the disc change as on a real drive.

        NotFound for a VM that does not run here or an unknown image, InvalidSpec for an image that is not
        an ISO, WrongState for a VM without a CD drive; nothing changes on a refusal."""
        raise HypervisorError(f"{type(self).__name__} has no CD drives")

    # -- the display (optional; the console proxy in kasou.agent.console) -------------------------

    async def vnc_socket(self, name: str) -> Path | None:
        """The unix socket of running VM ``name``'s VNC display on this host; None if it has none now."""
        return None

    async def serial_socket(self, name: str) -> Path | None:
        """The unix socket of running VM ``name``'s serial console (one client at a time); None if none now."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop monitoring (the VMs keep running)."""
