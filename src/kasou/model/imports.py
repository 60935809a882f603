"""Importing a VM from disk files or an OVF/OVA: the request, what the host found, and how it maps. Pure.

The phases (see :mod:`kasou.control.imports`): the request is checked here (:meth:`VMImport.check`);
the agent of the host that holds the files inspects them (:class:`ImportSource`: each disk's format
and virtual size, the OVF descriptor read with :func:`kasou.model.ovf.parse_ovf`); then
:func:`plan_import` maps it all onto a kasou VM, or refuses with the list of what cannot be mapped.
The plan is also the report a user reads: what became of each CPU, memory, disk, NIC and firmware.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from kasou.errors import InvalidSpec
from kasou.model.firmware import check_memory
from kasou.model.machine import validate_cpu, validate_machine
from kasou.model.names import validate_name
from kasou.model.ovf import OvfEnvelope, OvfItem, OvfSystem, unit_bytes
from kasou.model.parsing import parse_model
from kasou.model.spec import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, USER_NETWORK, check_priority
from kasou.model.units import format_size

DiskFormat = Literal["qcow2", "raw", "vmdk", "vpc", "vhdx"]
#: What people call qemu's formats (qemu names VHD ``vpc``).
FORMAT_NAMES = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx"}
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 1024  # a real OS needs more than the tiny guest's 128 MiB
MAX_SOURCE_DISKS = 16
FIRMWARE_NAMES = {"bios": "BIOS", "uefi": "UEFI", "uefi-secure": "UEFI with Secure Boot"}
PATH_MAX = 1024

CONTROLLERS = {5: "IDE", 6: "SCSI", 20: "SATA"}
NIC_TYPES = (10, 11)
DRIVES = (14, 15, 16)  # floppy, CD, DVD: empty ones are left out, ones holding an image refused
LEFT_OUT = (1, 23, 24, 35)  # other (VMCI, sound), USB, graphics, sound: the guest does without them
_DISK_REF = re.compile(r"^(?:ovf:)?/disk/([A-Za-z0-9._~-]{1,100})$")


class VMImport(BaseModel):
    """The request to import a VM: what ``kasou vm import`` and ``POST /v1/imports`` take.

    The files are paths on the host, in its transfer directory (``KASOU_TRANSFER_DIR``): a relative
    path is taken from there, an absolute one must lie inside it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    disks: list[str] | None = None  # disk files, the boot disk first
    ova: str | None = None
    ovf: str | None = None
    firmware: Literal["bios", "uefi", "uefi-secure"] | None = None  # None: the OVF's (BIOS without one)
    tpm: StrictBool = False  # a TPM 2.0 of its own (swtpm), as vm create --tpm
    vcpus: StrictInt | None = None  # None: the OVF's (1 without one)
    memory_mib: StrictInt | None = None  # None: the OVF's (1024 without one)
    cpu: str | None = None  # the virtual CPU model (kasou.model.machine; default x86-64-v2-AES)
    machine: str | None = None  # a q35 machine type (default: pinned to the host's QEMU)
    network: str = USER_NETWORK  # every NIC goes on this network
    pool: str | None = None  # the storage pool of its disks (default: the built-in pool)
    host: str | None = None  # the host whose transfer directory holds the files (default: any that has them)
    start: StrictBool = False
    description: str = Field("", max_length=500)
    department: str | None = None
    anti_affinity: str | None = None
    ha: StrictBool = False
    priority: StrictInt = Field(50)

    @classmethod
    def parse(cls, data: Any) -> VMImport:
        spec: VMImport = parse_model(cls, data)
        spec.check()
        return spec

    def check(self) -> None:
        validate_name(self.name)
        given = [k for k in ("disks", "ova", "ovf") if getattr(self, k)]
        if len(given) != 1:
            raise InvalidSpec("give the disk files (--disk, once per disk), an OVA (--ova) or an OVF (--ovf): "
                              "one of the three", field="disks")  # fmt: skip
        files = self.disks or [self.ova or self.ovf or ""]
        if len(files) > MAX_SOURCE_DISKS:
            raise InvalidSpec(f"at most {MAX_SOURCE_DISKS} disks can be imported at once", field="disks")
        for f in files:
            check_transfer_path(f)
        if self.vcpus is not None and not 1 <= self.vcpus <= MAX_VCPUS:
            raise InvalidSpec(f"vcpus must be between 1 and {MAX_VCPUS}, not {self.vcpus}", field="vcpus")
        if self.memory_mib is not None and not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidSpec(f"memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, not "
                              f"{self.memory_mib}", field="memory_mib")  # fmt: skip
        validate_name(self.network, "network")
        if self.cpu is not None:
            validate_cpu(self.cpu)
        if self.machine is not None:
            validate_machine(self.machine)
        for field in ("pool", "host", "department", "anti_affinity"):
            if getattr(self, field) is not None:
                validate_name(getattr(self, field), field)
        check_priority(self.priority)

    @property
    def source(self) -> str:
        """The files, as the user named them (for messages)."""
        if self.disks:
            return ", ".join(self.disks)
        return str(self.ova or self.ovf)


def check_transfer_path(path: str, what: str = "file") -> str:
    """A path a user may name in the transfer directory: not empty, no NUL, not absurdly long."""
    if not path or "\0" in path or len(path) > PATH_MAX or not path.strip():
        raise InvalidSpec(f"{what} {path[:80]!r} is not a usable path", field="disks")
    return path


class ImportInspect(BaseModel):
    """Body of the agent's ``POST /agent/v1/transfers/inspect``: which files to look at."""

    model_config = ConfigDict(extra="forbid")

    disks: list[str] = []
    ova: str | None = None
    ovf: str | None = None


class SourceDisk(BaseModel):
    """One disk file to import, as its host found it."""

    model_config = ConfigDict(extra="forbid")

    file: str  # as the user or the OVF named it
    path: str  # on the host: the file itself, or the OVA that holds it
    member: str | None = None  # in an OVA: the member's name ...
    offset: int | None = None  # ... and where its bytes are in the archive
    length: int | None = None
    format: DiskFormat
    subformat: str | None = None  # vmdk: monolithicSparse, streamOptimized, twoGbMaxExtentSparse, ...
    virtual_size: int
    file_bytes: int  # what its file (or files) hold
    digest: str | None = None  # "sha256:<hex>" (or sha1, sha512) from the OVF's manifest: checked first

    def describe(self) -> str:
        sub = f" {self.subformat}" if self.subformat else ""
        return f"{self.file} ({FORMAT_NAMES[self.format]}{sub}, {format_size(self.virtual_size)})"


class ImportSource(BaseModel):
    """What ``POST /agent/v1/transfers/inspect`` found."""

    kind: Literal["disks", "ova", "ovf"]
    file: str = ""  # the OVA or OVF
    disks: list[SourceDisk] = []  # --disk: in the order given
    ovf: OvfEnvelope | None = None
    ovf_disks: dict[str, SourceDisk] = {}  # OVF diskId -> its file
    manifest: str | None = None  # what the manifest check found (e.g. "SHA256 of 2 files to check")


class PlannedDisk(BaseModel):
    id: str
    source: SourceDisk | None = None  # None: an empty disk (an OVF disk without a file)
    size_bytes: int
    origin: str  # for the report


class PlannedNic(BaseModel):
    id: str
    origin: str
    network: str


class ImportPlan(BaseModel):
    """How an import maps onto a kasou VM; also its report."""

    source: str
    vcpus: int
    vcpus_from: str
    memory_mib: int
    memory_from: str
    firmware: Literal["bios", "uefi", "uefi-secure"]
    firmware_from: str
    tpm: bool = False
    cpu: str | None = None  # set once the host is chosen (the machine type is pinned to its QEMU)
    machine: str | None = None
    os: str | None = None
    disks: list[PlannedDisk]
    nics: list[PlannedNic]
    controllers: list[str] = []
    left_out: list[str] = []  # devices not carried over, and why
    notes: list[str] = []

    @property
    def virtual_bytes(self) -> int:
        return sum(d.size_bytes for d in self.disks)

    def report(self) -> list[str]:
        """The report, one line per thing that was mapped."""
        out = [f"source    {self.source}"]
        if self.os:
            out.append(f"os        {self.os}")
        out.append(f"vCPUs     {self.vcpus} ({self.vcpus_from})")
        out.append(f"memory    {self.memory_mib} MiB ({self.memory_from})")
        out.append(f"firmware  {FIRMWARE_NAMES[self.firmware]} ({self.firmware_from})")
        if self.tpm:
            out.append("tpm       TPM 2.0 (given)")
        if self.cpu or self.machine:
            out.append(f"cpu       {self.cpu or '-'}, machine {self.machine or '-'}")
        for d in self.disks:
            out.append(f"{d.id:9} {d.origin} -> qcow2, {format_size(d.size_bytes)}, virtio")
        for c in self.controllers:
            out.append(f"{'':9} {c} -> virtio (each disk its own virtio-blk device)")
        for n in self.nics:
            out.append(f"{n.id:9} {n.origin} -> virtio-net on network {n.network}")
        if not self.nics:
            out.append("nics      none")
        out += [f"left out  {x}" for x in self.left_out]
        out += [f"note      {x}" for x in self.notes]
        return out


def plan_import(req: VMImport, src: ImportSource) -> ImportPlan:
    """Map what the host found onto a VM; InvalidSpec listing everything that cannot be mapped."""
    if src.kind == "disks":
        return _plan_disks(req, src)
    problems: list[str] = []
    plan = _plan_ovf(req, src, problems)
    if problems:
        raise InvalidSpec(f"cannot import {req.name!r} from {src.file}: {'; '.join(problems)}", field="ovf")
    assert plan is not None
    return plan


def check_firmware(req: VMImport, plan: ImportPlan) -> None:
    """What the imported VM boots with must work in kasou: UEFI's least memory; set the plan's TPM."""
    check_memory(plan.firmware, plan.memory_mib)
    plan.tpm = req.tpm


def _plan_disks(req: VMImport, src: ImportSource) -> ImportPlan:
    return ImportPlan(
        source=", ".join(d.file for d in src.disks),
        vcpus=req.vcpus or DEFAULT_VCPUS,
        vcpus_from="given" if req.vcpus else "default",
        memory_mib=req.memory_mib or DEFAULT_MEMORY_MIB,
        memory_from="given" if req.memory_mib else "default",
        firmware=req.firmware or "bios",
        firmware_from="given" if req.firmware else "default",
        disks=[
            PlannedDisk(id=f"disk{i}", source=d, size_bytes=d.virtual_size, origin=d.describe())
            for i, d in enumerate(src.disks)
        ],
        nics=[PlannedNic(id="net0", origin="a NIC", network=req.network)],
        notes=["disk0 is the boot disk"] if len(src.disks) > 1 else [],
    )


def _plan_ovf(req: VMImport, src: ImportSource, problems: list[str]) -> ImportPlan | None:
    env = src.ovf
    if env is None:
        problems.append("no OVF descriptor was found")
        return None
    if env.collection or len(env.systems) != 1:
        n = len(env.systems)
        problems.append(f"it describes {n} virtual systems{' (a vApp)' if env.collection else ''}; kasou imports "
                        "one VM at a time" if n else "it describes no virtual system")  # fmt: skip
        return None
    vs = env.systems[0]
    by_id = {it.instance_id: it for it in vs.items if it.instance_id}
    plan = ImportPlan(
        source=src.file, vcpus=DEFAULT_VCPUS, vcpus_from="default", memory_mib=DEFAULT_MEMORY_MIB,
        memory_from="default", firmware="bios", firmware_from="the OVF", disks=[], nics=[], os=_os(vs),
    )  # fmt: skip
    _cpu_and_memory(vs, plan, problems)
    if req.vcpus is not None:
        said = f"; the OVF says {plan.vcpus}" if plan.vcpus_from == "the OVF" else ""
        plan.vcpus, plan.vcpus_from = req.vcpus, f"given{said}"
    if req.memory_mib is not None:
        said = f"; the OVF says {plan.memory_mib} MiB" if plan.memory_from == "the OVF" else ""
        plan.memory_mib, plan.memory_from = req.memory_mib, f"given{said}"
    ovf_fw: Literal["bios", "uefi", "uefi-secure"] = "bios"
    if vs.firmware == "efi":
        ovf_fw = "uefi-secure" if vs.secure_boot else "uefi"
    plan.firmware_from = "the OVF: vmw:Config firmware=" + vs.firmware + (", Secure Boot" if vs.secure_boot else "")
    plan.firmware = ovf_fw
    if req.firmware is not None:
        plan.firmware, plan.firmware_from = req.firmware, f"given; {plan.firmware_from}"
    disks: list[tuple[tuple[int, int, int], PlannedDisk]] = []
    for pos, it in enumerate(vs.items):
        rt = it.resource_type
        if rt in (3, 4):
            continue
        if rt == 17:
            d = _disk(it, pos, vs, by_id, src, env, problems)
            if d is not None:
                disks.append(d)
        elif rt in NIC_TYPES:
            where = f" on OVF network {it.connection!r}" if it.connection else ""
            adapter = f"{it.subtype} " if it.subtype else ""
            plan.nics.append(PlannedNic(id=f"net{len(plan.nics)}", origin=f"{adapter}{it.kind}{where}",
                                        network=req.network))  # fmt: skip
        elif rt in CONTROLLERS:
            plan.controllers.append(it.kind + (f" ({it.subtype})" if it.subtype else ""))
        elif rt in DRIVES:
            if it.host_resource:
                problems.append(f"{it.kind} holds {it.host_resource}: kasou does not attach CD, DVD or floppy "
                                "images yet")  # fmt: skip
            else:
                plan.left_out.append(f"{it.kind} (empty)")
        elif rt in LEFT_OUT:
            plan.left_out.append(it.kind + (f" ({it.subtype})" if it.subtype else ""))
        elif not it.required:
            plan.left_out.append(f"{it.kind} (optional in the OVF)")
        else:
            problems.append(f"{it.kind} (ResourceType {rt}) has no counterpart in kasou")
    disks.sort(key=lambda x: x[0])
    plan.disks = [d.model_copy(update={"id": f"disk{i}"}) for i, (_k, d) in enumerate(disks)]
    if not plan.disks and not problems:
        problems.append("it has no disk")
    if len(plan.disks) > 1:
        plan.notes.append("disks in the order of their controllers and addresses; disk0 is the boot disk")
    if vs.secure_boot and plan.firmware != "uefi-secure":
        plan.notes.append(f"the OVF asks for Secure Boot; it boots {FIRMWARE_NAMES[plan.firmware]} as given")
    return plan


def _os(vs: OvfSystem) -> str | None:
    parts = [p for p in (vs.os_description, vs.os_type and f"vmw:osType {vs.os_type}") if p]
    return ", ".join(parts) or None


def _cpu_and_memory(vs: OvfSystem, plan: ImportPlan, problems: list[str]) -> None:
    cpus = [it for it in vs.items if it.resource_type == 3]
    if cpus and cpus[0].quantity is not None:
        plan.vcpus, plan.vcpus_from = cpus[0].quantity, "the OVF"
        if not 1 <= plan.vcpus <= MAX_VCPUS:
            problems.append(f"{plan.vcpus} vCPUs (kasou runs 1 to {MAX_VCPUS})")
    mem = [it for it in vs.items if it.resource_type == 4]
    if mem and mem[0].quantity is not None:
        unit = unit_bytes(mem[0].units or "byte * 2^20")
        if unit is None:
            problems.append(f"memory given in {mem[0].units!r}, a unit kasou cannot read")
            return
        mib = math.ceil(mem[0].quantity * unit / 2**20)
        plan.memory_mib, plan.memory_from = mib, "the OVF" + ("" if mem[0].units else ", read as MiB")
        if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
            problems.append(f"{mib} MiB of memory (kasou runs {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB)")


def _disk(
    it: OvfItem,
    pos: int,
    vs: OvfSystem,
    by_id: dict[str, OvfItem],
    src: ImportSource,
    env: OvfEnvelope,
    problems: list[str],
) -> tuple[tuple[int, int, int], PlannedDisk] | None:
    m = _DISK_REF.match(it.host_resource or "")
    if m is None:
        problems.append(f"{it.kind} refers to {it.host_resource!r}, not to a disk of the DiskSection (ovf:/disk/ID)")
        return None
    disk = env.disk(m.group(1))
    if disk is None:
        problems.append(f"{it.kind} refers to disk {m.group(1)!r}, which the DiskSection does not list")
        return None
    ctrl = by_id.get(it.parent or "")
    where = ""
    order = (len(vs.items), 0, pos)
    if ctrl is not None:
        kind = CONTROLLERS.get(ctrl.resource_type or 0, ctrl.kind)
        addr = it.address_on_parent or "0"
        where = f" at {kind} {ctrl.address or '0'}:{addr}"
        order = (vs.items.index(ctrl), int(addr) if addr.isdigit() else 0, pos)
    if disk.parent_ref:
        problems.append(f"disk {disk.disk_id!r} is a delta of disk {disk.parent_ref!r} (consolidate the "
                        "snapshots before the export)")  # fmt: skip
        return None
    if disk.file_ref is None:
        if not disk.capacity_bytes:
            problems.append(f"disk {disk.disk_id!r} has neither a file nor a capacity")
            return None
        return order, PlannedDisk(id="", size_bytes=disk.capacity_bytes,
                                  origin=f"empty disk {disk.disk_id}{where}")  # fmt: skip
    f = env.file(disk.file_ref)
    if f is None:
        problems.append(f"disk {disk.disk_id!r} names file {disk.file_ref!r}, which References does not list")
        return None
    if f.compression:
        problems.append(f"file {f.href!r} is compressed ({f.compression}); unpack the package first")
        return None
    if f.chunk_size:
        problems.append(f"file {f.href!r} is split in chunks; join them first")
        return None
    source = src.ovf_disks.get(disk.disk_id)
    if source is None:
        problems.append(f"disk {disk.disk_id!r}: its file {f.href!r} was not found")
        return None
    size = max(source.virtual_size, disk.capacity_bytes or 0)
    return order, PlannedDisk(id="", source=source, size_bytes=size, origin=f"{source.describe()}{where}")
