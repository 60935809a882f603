"""The request and response models of a host agent's disks and backups: what the control plane sends to
an agent and gets back (through :mod:`kasou.agent.client`). Models only: the code that makes disks
(:mod:`kasou.agent.storage`, which also reads images) and backups (:mod:`kasou.agent.backups`) imports
them from here, so the control plane never imports that code."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kasou.hypervisor.backups import BackupKind
from kasou.model.firmware import Firmware
from kasou.model.imports import SourceDisk
from kasou.model.ovf_write import OvfExport


class DiskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str
    disk_id: str
    size_bytes: int | None = None
    source: Literal["blank", "image", "overlay", "copy"] = "blank"
    image: str | None = None  # for source=image
    backing: str | None = None  # for source=overlay: a disk path on this host
    shared: bool = False  # make it in the shared storage every host sees
    pool: str | None = None  # make it in this storage pool (its directory: pool_path)
    pool_path: str | None = None  # None: the built-in pool, this host's disk directory
    copy_of: str | None = None  # for source=copy: a disk of this host to copy (a mirror's rebuild, offline)


class MediaChange(BaseModel):
    """Body of the agent's ``POST /vms/{name}/media``: the ISO image (of this host) for the VM's CD drive,
    or None to empty it."""

    model_config = ConfigDict(extra="forbid")

    iso: str | None = None


class DiskGrow(BaseModel):
    """Grow a disk: of a running VM (``POST /agent/v1/vms/{name}/disks/{id}/grow``, QMP ``block_resize``) or
    a file of a stopped one (``POST /agent/v1/disks/grow``, ``qemu-img resize``, ``path`` given)."""

    model_config = ConfigDict(extra="forbid")

    size_bytes: int = Field(gt=0)
    path: str | None = None


class DiskInfo(BaseModel):
    path: str
    format: str
    size_bytes: int
    allocated_bytes: int
    backing: str | None = None


class BackupSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disk_id: str
    path: str  # the disk's file (read only when the VM is not running)
    format: str = "qcow2"
    backing: str | None = None  # the previous generation's file on this host: incremental to it if possible
    base_bitmap: str | None = None  # the bitmap named after that generation


class BackupCreate(BaseModel):
    """Body of ``POST /agent/v1/vms/{name}/backups``."""

    model_config = ConfigDict(extra="forbid")

    generation: int = Field(ge=1)
    backup_id: str
    disks: list[BackupSource] = Field(min_length=1)
    timeout_s: float = Field(default=1800.0, gt=0, le=86_400)
    bandwidth_mib_s: int | None = Field(default=None, ge=1)  # limit a running VM's backup copy
    tpm_state: str | None = None  # the VM's TPM state directory: copied into the generation too


class BackupFile(BaseModel):
    """One disk's file of a generation, verified."""

    disk_id: str
    kind: BackupKind
    path: str
    backing: str | None
    bitmap: str | None
    size_bytes: int  # the disk's virtual size
    file_bytes: int  # what the file takes in the backup directory
    bytes_copied: int
    digest: str  # content digest of the generation (through its chain)
    note: str = ""


class TpmBackup(BaseModel):
    """A generation's copy of a TPM's state: one tar file of its state directory."""

    path: str
    digest: str  # sha256 of the file
    file_bytes: int


class BackupMade(BaseModel):
    running: bool  # made from a running VM (dirty bitmaps) or a stopped one (qemu-img)
    files: list[BackupFile]
    copy_s: float  # the copy itself
    verify_s: float  # qemu-img check and the content digest
    tpm: TpmBackup | None = None  # the TPM's state, when asked
    # a running VM's: application (its guest agent froze the file systems at the point in time) or crash (no
    # agent answered: as after a power cut); None: a stopped VM's disks
    consistency: Literal["application", "crash"] | None = None


class BackupCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    digest: str


class BackupPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str


class BackupRestore(BaseModel):
    """Body of ``POST /agent/v1/backups/restore``: a new VM's disk from a generation, if it verifies."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    disk_id: str
    path: str
    digest: str
    format: Literal["qcow2", "raw"] = "qcow2"  # raw: a UEFI variable store (efivars.fd beside the disks)


class BackupPrune(BaseModel):
    """Body of ``POST /agent/v1/backups/prune``: drop the oldest generation; its child becomes self-contained."""

    model_config = ConfigDict(extra="forbid")

    path: str
    child: str | None = None  # the generation whose backing file ``path`` is
    child_digest: str | None = None  # checked after the merge


class DiskImport(BaseModel):
    """Body of ``POST /agent/v1/transfers/imports``: a new disk of a VM, converted from a file of the host's
    transfer directory (:class:`kasou.model.imports.SourceDisk`, as its inspection found it) or empty."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    disk_id: str
    source: SourceDisk | None = None  # None: an empty disk of size_bytes
    size_bytes: int = Field(gt=0)  # grown to this if the source is smaller (an OVF's capacity)
    shared: bool = False
    pool: str | None = None
    pool_path: str | None = None


class ExportDiskSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    path: str  # a disk of this host (read through its chain: a VM with snapshots exports what it shows now)
    format: str = "qcow2"


class ExportCreate(BaseModel):
    """Body of ``POST /agent/v1/transfers/exports``: a stopped VM's disks and descriptor into an OVA."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    file: str  # the OVA to write, in the host's transfer directory (refused if it exists)
    disks: list[ExportDiskSource] = Field(min_length=1)
    ovf: OvfExport  # its disks are filled in by the agent once they are converted


class GuestConvert(BaseModel):
    """Body of ``POST /agent/v1/transfers/conversions``: run virt-v2v in place on a new VM's disks (boot disk
    first), VMware's drivers and tools out, virtio in (:mod:`kasou.agent.v2v`)."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    disks: list[str] = Field(min_length=1, max_length=16)  # qcow2 disks of this host, as the import made them


class TransferStatus(BaseModel):
    """An import, export or conversion running on a host (``GET /agent/v1/transfers/{id}``)."""

    id: str
    kind: Literal["import", "export", "convert"]
    vm: str
    state: Literal["running", "succeeded", "failed"] = "running"
    progress: float = 0.0
    step: str = ""
    targets: list[str] = []  # the files it makes (removed if it fails or is cancelled)
    error: dict[str, Any] | None = None  # a KasouError's dict
    result: dict[str, Any] | None = None  # import: a DiskInfo; export: file, bytes; convert: os, changes, warnings


class FirmwareCreate(BaseModel):
    """Body of ``POST /agent/v1/firmware``: a new VM's firmware state, in the directory of its first disk."""

    model_config = ConfigDict(extra="forbid")

    vm: str
    beside: str  # the VM's first disk (its directory holds the VM's files)
    firmware: Firmware = "bios"  # uefi, uefi-secure: a UEFI variable store
    vars_of: str | None = None  # copy this variable store (a linked clone keeps its template's boot entries)
    tpm: bool = False  # manufacture a new TPM 2.0


class FirmwareFiles(BaseModel):
    nvram: str | None = None  # the VM's UEFI variable store
    tpm_state: str | None = None  # its TPM's state directory


class TpmRestore(BaseModel):
    """Body of ``POST /agent/v1/backups/restore-tpm``: a new VM's TPM state from a generation, if it verifies."""

    model_config = ConfigDict(extra="forbid")

    path: str
    digest: str
    beside: str  # the new VM's first disk (restored already): the state goes in its directory


class VaultTarget(BaseModel):
    """A backup server as a host reaches it (docs/backup-server.md): its URL, a token it issued, its certificate's
    SHA-256 fingerprint (pinned; None only for a loopback http URL)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    token: str
    fingerprint: str | None = None


class OffsiteDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disk_id: str
    path: str  # the generation's file on this host (in its backup directory)
    format: Literal["qcow2", "raw"] = "qcow2"
    # the generation whose file is this one's backing file: only the clusters of this file changed since it
    incremental_of: int | None = None


class BackupSend(BaseModel):
    """Body of ``POST /agent/v1/vms/{name}/backups/send``: copy a generation made on this host to a backup server."""

    model_config = ConfigDict(extra="forbid")

    server: VaultTarget
    public_key: dict[str, Any]  # kasou.vault.crypt.PublicBackupKey's JSON: encrypts, cannot decrypt
    vm_uuid: str
    generation: int = Field(ge=1)
    created: float
    disks: list[OffsiteDisk] = Field(min_length=1)
    tpm_path: str | None = None  # the generation's TPM state tar (in the backup directory)
    config: dict[str, Any] = {}  # the VM's settings at the generation (sealed with it)


class BackupSent(BaseModel):
    generation: int
    key_fingerprint: str
    bytes_logical: int  # the disks' sizes
    bytes_read: int  # what was read of them (an incremental reads only its changed chunks)
    bytes_sent: int  # what the backup server did not hold already (deduplicated), compressed and encrypted
    incremental: bool
    locked_until: float | None = None
    seconds: float
    note: str = ""


class OffsiteRestore(BaseModel):
    """Body of ``POST /agent/v1/backups/offsite/restore``: one disk of a new VM from a backup server's generation.

    ``key`` is the backup key's private part (kasou.vault.crypt.BackupKey JSON), given by the operator for
    this restore: it is used in memory and never written."""

    model_config = ConfigDict(extra="forbid")

    server: VaultTarget
    key: dict[str, Any]
    source_vm: str
    generation: int = Field(ge=1)
    vm: str  # the new VM
    disk_id: str = "root"  # a disk of the generation (unused for the TPM state)
    format: Literal["qcow2", "raw"] = "qcow2"
    beside: str | None = None  # the TPM state: the new VM's first disk, whose directory gets it


class OffsiteFile(BaseModel):
    """Body of ``POST /agent/v1/backups/offsite/file``: one file of a generation's disk, read-only."""

    model_config = ConfigDict(extra="forbid")

    server: VaultTarget
    key: dict[str, Any]  # the backup key's private part, for this request only
    source_vm: str
    generation: int = Field(ge=1)
    disk_id: str | None = None  # None: the first disk
    path: str  # absolute, in the guest
