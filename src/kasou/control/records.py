"""What the control plane keeps in the store, and under which keys."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from kasou.model.cloudinit import CloudInit
from kasou.model.firmware import Firmware, GuestOs
from kasou.model.snapshots import SnapshotRecord
from kasou.model.spec import DiskSpec, NicSpec, Startup
from kasou.model.state import VMState


def vm_key(name: str) -> str:
    return f"vms/{name}"


def job_key(job_id: str) -> str:
    return f"jobs/{job_id}"


def ledger_prefix(name: str) -> str:
    return f"ledger/{name}/"


class ReplicaRecord(BaseModel):
    """Where a replicated VM's second copy lives, and how it is doing."""

    host: str
    state: str = "syncing"  # syncing, in_sync, degraded
    paths: dict[str, str] = {}  # disk id -> the replica file on that host
    since: float = Field(default_factory=time.time)


class VMRecord(BaseModel):
    name: str
    uuid: str  # made at create: what belongs to the VM (backups, jobs, ledger, console log) carries it
    vcpus: int
    memory_mib: int
    image: str | None = None  # boot image (kernel and initramfs)
    cpu: str | None = None  # virtual CPU model (kasou.model.machine); None: QEMU's default (VMs made before)
    machine: str | None = None  # pinned q35 machine type; None: the q35 alias (VMs made before)
    firmware: Firmware = "bios"  # bios, uefi, uefi-secure (kasou.model.firmware): fixed at creation
    nvram: str | None = None  # UEFI: its own variable store, beside its first disk
    tpm_state: str | None = None  # a TPM 2.0: its state directory, beside its first disk; None: no TPM
    os: GuestOs | None = None  # windows: Hyper-V enlightenments, RTC in local time
    template: str | None = None  # linked clone of this template
    cdrom_drive: bool = False  # it has a CD drive (made with --cdrom; kasou.model.media)
    cdrom: str | None = None  # the ISO image in its CD drive (None: empty); on its host's image store
    boot: list[str] | None = None  # the firmware's boot order (None: disk, then CD)
    description: str = ""
    department: str | None = None  # its department's vendor may manage it
    criticality: str | None = None  # 24h-clinical, business-hours or batch (its backups' defaults follow it)
    anti_affinity: str | None = None  # never on one host with another running VM of this group
    ha: bool = False  # restarted elsewhere when its host fails; reset when its guest hangs
    priority: int = 50  # HA restart order, highest first (0..100)
    startup: Startup | None = None  # started when its host boots (kasou.control.onboot)
    tags: list[str] = []  # sorted, each once (kasou.model.selection): lists filter on them, bulk actions select by them
    cloud_init: CloudInit | None = None  # its NoCloud seed, made by its host at each start
    replicated: bool = False  # its local disks have a synchronous replica on another host while it runs
    replica: ReplicaRecord | None = None
    ha_armed: bool = False  # its running QEMU was launched HA-protected (its host's guard fences it)
    disks: list[DiskSpec] = []
    snapshots: list[SnapshotRecord] = []  # oldest first; disks[].path is the newest one's overlay
    nics: list[NicSpec] = []
    # vCPUs and memory set while it ran (kasou vm set): applied at its next start (kasou.control.devices)
    next_start: dict[str, int] = {}
    # hot-plug PCIe root ports its QEMU has (given at a start; None: started before kasou had them, none)
    pci_ports: int | None = None
    state: VMState = VMState.CREATING
    host: str | None = None
    created_at: float = Field(default_factory=time.time)
    state_since: float = Field(default_factory=time.time)
    started_at: float | None = None
    job: str | None = None  # the job that holds the VM now
    last_error: str | None = None

    def with_state(self, state: VMState, **changes: Any) -> VMRecord:
        upd = {"state": state, **changes}
        if state != self.state:
            upd["state_since"] = time.time()
        return self.model_copy(update=upd)


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobRecord(BaseModel):
    id: str
    kind: str
    vm: str | None = None
    # The VM's uuid and department when the job was submitted: a department-scoped user reaches the job by
    # these, not by whichever VM holds the name now (None in records made before kasou kept them).
    vm_uuid: str | None = None
    department: str | None = None
    state: JobState = JobState.PENDING
    progress: float = 0.0
    step: str = ""
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED)


class LedgerEvent(StrEnum):
    DEFINED = "defined"
    STARTED = "started"
    MIGRATED = "migrated"
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPED = "stopped"
    CRASHED = "crashed"
    RESTARTED = "restarted"
    FENCED = "fenced"  # its host lost the cluster and killed it (self-fencing) before it ran elsewhere


class LedgerEntry(BaseModel):
    time: float
    event: LedgerEvent
    host: str | None = None  # where the VM is after the event
    detail: str = ""
    from_host: str | None = None  # for migrated: where it came from
    uuid: str | None = None  # the VM's uuid (None in entries made before kasou kept it)
