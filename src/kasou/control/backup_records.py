"""The backup records in the store and the pure rules over them (unit-tested): which keys, which generations
belong to a VM, what a backup copies, what retention drops, when a schedule's slot was. Used by
:mod:`kasou.control.backups`, which runs them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from kasou.agent.models import BackupSource, TpmBackup
from kasou.control.offsite import OffsiteCopy
from kasou.control.records import VMRecord
from kasou.errors import InvalidSpec
from kasou.model.firmware import VARS_ID, Firmware, GuestOs
from kasou.model.retention import Counts, Held, select
from kasou.model.spec import NicSpec
from kasou.model.timeofday import parse_hhmm


def backups_prefix(vm: str) -> str:
    return f"backups/{vm}/"


def backup_key(vm: str, generation: int) -> str:
    return f"backups/{vm}/{generation:08d}"


def policy_key(vm: str) -> str:
    return f"backup-policy/{vm}"


class BackupDiskRecord(BaseModel):
    disk_id: str
    path: str
    backing: str | None  # the previous generation's file (an incremental), None: self-contained
    kind: Literal["full", "incremental"]
    size_bytes: int
    file_bytes: int
    bytes_copied: int
    digest: str
    note: str = ""


class BackupRecord(BaseModel):
    vm: str
    generation: int  # unique among the generations of the name, whichever VM they belong to
    vm_uuid: str | None = None  # the VM backed up (None: recorded before kasou kept it)
    department: str | None = None  # that VM's department when it was backed up
    id: str
    host: str
    kind: Literal["full", "incremental"]  # incremental if any disk is
    created_at: float
    duration_s: float
    running: bool  # taken from the running VM or from a stopped one
    # a running VM's point in time: application (its guest agent froze the file systems) or crash (no agent
    # answered); None: a stopped VM's, or recorded before kasou froze guests
    consistency: Literal["application", "crash"] | None = None
    scheduled: bool = False
    bitmap: str | None  # the dirty bitmap that records writes since this generation
    note: str = ""
    disks: list[BackupDiskRecord]
    # what a restore makes (the VM may be gone by then)
    vcpus: int
    memory_mib: int
    image: str | None
    nics: list[NicSpec]
    cpu: str | None = None
    machine: str | None = None
    firmware: Firmware = "bios"
    os: GuestOs | None = None
    tpm: TpmBackup | None = None  # the TPM's state (its UEFI variables are the disk "efivars")
    offsite: OffsiteCopy | None = None  # its copy on the backup server (kasou.control.offsite)
    offsite_error: str | None = None  # why it could not be copied there


class BackupView(BaseModel):
    vm: str
    generation: int
    vm_uuid: str | None  # the VM it belongs to (None: recorded before kasou kept it)
    department: str | None
    kind: Literal["full", "incremental"]
    based_on: int | None  # the generation an incremental's files rest on (None: self-contained)
    created_at: float
    host: str
    running: bool
    consistency: Literal["application", "crash"] | None = None
    scheduled: bool
    size_bytes: int  # the disks' virtual size
    file_bytes: int  # what its files take in the backup directory
    bytes_copied: int
    duration_s: float
    note: str
    disks: list[BackupDiskRecord]
    offsite: OffsiteCopy | None = None
    offsite_error: str | None = None
    # its copy on the backup server, in the words of ``kasou backup list --json`` (the server's state when
    # the list asked it: ``server_error`` says why it could not; None fields are then not known)
    time: float = 0.0  # the point in time it holds (= created_at)
    server_generation: int | None = None  # its number on the backup server
    bytes_sent: int | None = None  # what its copy sent over the network
    locked_until: float | None = None
    verified_at: float | None = None
    damaged: list[str] = Field(default_factory=list)
    copied_to: list[dict[str, Any]] = Field(default_factory=list)  # second sites holding it: {site, at}
    server_error: str | None = None


# -- pure helpers (unit-tested) -----------------------------------------------------------


def parse_daily(value: str) -> tuple[int, int]:
    return parse_hhmm(value, "--daily", "daily")


def check_keep(keep: int) -> int:
    if not 1 <= keep <= 1000:
        raise InvalidSpec(f"retention must keep between 1 and 1000 generations, not {keep}", field="keep")
    return keep


def to_prune(recs: list[BackupRecord], counts: Counts, now: float) -> list[int]:
    """The generations retention drops (:mod:`kasou.model.retention`, by the time each was taken), oldest first."""
    decisions = select([Held(r.generation, r.created_at) for r in recs], counts, now)
    return sorted(d.generation for d in decisions if not d.keep)


def belongs(r: BackupRecord, vm: VMRecord) -> bool:
    """Is generation ``r`` one of VM ``vm``'s (an unmarked old one: if it is not older than the VM)?"""
    return r.vm_uuid == vm.uuid or (r.vm_uuid is None and r.created_at >= vm.created_at)


def plan_sources(rec: VMRecord, prev: BackupRecord | None, incremental: bool) -> tuple[list[BackupSource], str]:
    """What to ask the agent for each disk; and why an incremental request cannot be one (or "")."""
    why = ""
    if incremental and prev is None:
        why = "full backup: there is no earlier generation"
    elif incremental and prev is not None and prev.host != rec.host:
        why = f"full backup: the previous generation is on host {prev.host}, the VM is on {rec.host}"
    use = prev if incremental and not why else None
    out = []
    for d in rec.disks:
        old = next((x for x in use.disks if x.disk_id == d.id), None) if use is not None else None
        out.append(
            BackupSource(
                disk_id=d.id, path=d.path or "", format=d.format,
                backing=old.path if old is not None else None,
                base_bitmap=use.bitmap if old is not None and use is not None else None,
            )
        )  # fmt: skip
    if rec.nvram is not None:  # the UEFI variables: half a MiB, always copied whole
        out.append(BackupSource(disk_id=VARS_ID, path=rec.nvram, format="raw"))
    return out, why


def view(r: BackupRecord, by_path: dict[str, int]) -> BackupView:
    based = [g for d in r.disks if d.backing is not None and (g := by_path.get(d.backing)) is not None]
    return BackupView(
        vm=r.vm, generation=r.generation, vm_uuid=r.vm_uuid, department=r.department, kind=r.kind,
        based_on=min(based) if based else None, created_at=r.created_at, host=r.host, running=r.running,
        consistency=r.consistency, scheduled=r.scheduled,
        size_bytes=sum(d.size_bytes for d in r.disks), file_bytes=sum(d.file_bytes for d in r.disks),
        bytes_copied=sum(d.bytes_copied for d in r.disks), duration_s=r.duration_s, note=r.note, disks=r.disks,
        offsite=r.offsite, offsite_error=r.offsite_error, time=r.created_at,
        server_generation=r.offsite.generation if r.offsite else None,
        bytes_sent=r.offsite.bytes_sent if r.offsite else None,
        locked_until=r.offsite.locked_until if r.offsite else None,
    )  # fmt: skip


def with_server(views: list[BackupView], listing: list[dict[str, Any]] | None, error: str | None) -> list[BackupView]:
    """The views with what the backup server says of each copy (its lock, verification, second sites)."""
    held = {int(g["generation"]): g for g in listing or []}
    out = []
    for v in views:
        g = held.get(v.server_generation) if v.server_generation is not None else None
        if error is not None:
            out.append(v.model_copy(update={"server_error": error}))
        elif g is None:
            out.append(v)
        else:
            out.append(v.model_copy(update={
                "locked_until": g.get("locked_until"), "verified_at": g.get("verified_at"),
                "damaged": list(g.get("damaged") or []),
                "copied_to": [c for c in g.get("copied_to") or [] if isinstance(c, dict)],
            }))  # fmt: skip
    return out
