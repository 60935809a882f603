"""What a user asks for: VM specs, names and sizes, validated before anything happens.

Validation is strict and total: anything that is not clearly right is refused
with an :class:`~kasou.errors.InvalidSpec` naming the field, before kasou
touches a disk or a process.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from kasou.errors import InvalidSpec
from kasou.model.cloudinit import CloudInit
from kasou.model.criticality import parse_criticality
from kasou.model.devices import MAX_DISKS
from kasou.model.firmware import check_storage, resolve
from kasou.model.machine import validate_cpu, validate_machine
from kasou.model.media import check_boot, parse_boot
from kasou.model.names import NAME_MAX as NAME_MAX
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model
from kasou.model.selection import check_tags
from kasou.model.units import parse_size

USER_NETWORK = "user"  # QEMU's user-mode NAT: needs nothing on the host; not a stored network
VLAN_MIN, VLAN_MAX = 1, 4094  # 0 and 4095 are reserved by 802.1Q

MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 4 * 1024 * 1024  # 4 TiB: a sanity bound; the host check is separate
MAX_VCPUS = 255
MAX_CREATE_DISKS = MAX_DISKS  # the boot disk and the data disks given at creation


def random_mac() -> str:
    """A locally administered unicast MAC in QEMU's customary 52:54:00 range."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


MirrorState = Literal["syncing", "in_sync", "degraded"]


class MirrorCopy(BaseModel):
    """The second copy of a mirrored disk (RAID-1 across two pools of one host)."""

    model_config = ConfigDict(extra="forbid")

    pool: str  # the pool of the second copy (while degraded: of the copy that was lost)
    path: str | None = None  # None while degraded: the disk runs on one copy
    state: MirrorState = "syncing"
    clean: bool = False  # both copies were equal when the VM last stopped (its next start copies nothing)
    failed: str | None = None  # the file of a copy that failed (removed at the rebuild)
    error: str | None = None
    since: float | None = None


class DiskSpec(BaseModel):
    """One virtual disk of a VM as recorded in the store."""

    model_config = ConfigDict(extra="forbid")

    id: str  # disk0, disk1, ...
    size_bytes: int
    format: str = "qcow2"
    path: str | None = None  # on the VM's host; set once the disk exists
    backing: str | None = None  # backing file (image or template disk), if any
    linked: bool = False  # an overlay on a template: the template must outlive it
    shared: bool = False  # on storage every host sees (migration moves no disk data)
    pool: str = "default"  # the storage pool of its file (the copy it runs on)
    mirror: MirrorCopy | None = None  # RAID-1: its second copy in another pool
    port: int | None = None  # its hot-plug PCIe root port (None: the root bus, where QEMU cannot unplug it)


class NicSpec(BaseModel):
    """One NIC of a VM. Its MAC, network and VLAN are fixed at creation and travel with the VM."""

    model_config = ConfigDict(extra="forbid")

    id: str  # net0, ...
    mac: str
    network: str = USER_NETWORK
    vlan: int | None = None  # the network's 802.1Q VLAN when the VM was created (None: untagged)
    isolated: bool = False  # its network never reaches the uplink: the VMs of one host only (a restore drill's)
    port: int | None = None  # its hot-plug PCIe root port (None: the root bus, where QEMU cannot unplug it)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not _MAC_RE.fullmatch(v) or int(v[:2], 16) & 1:
            raise ValueError(f"{v!r} is not a unicast MAC address")
        return v


PRIORITY_MIN, PRIORITY_MAX = 0, 100


def check_priority(value: int) -> None:
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise InvalidSpec(f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, not {value}", field="priority")


STARTUP_ORDER_MAX = 1000
STARTUP_DELAY_MAX_S = 600


class Startup(BaseModel):
    """Starting a VM when its host boots (``--onboot --order N --delay S``, as Proxmox's onboot/startup).

    When a host's agent starts and finds no VM running there (the host booted, or kasou was started
    after ``kasou down --vms``), the VMs of that host marked ``onboot`` start in ``order`` (lowest
    first; by name within one order), each ``delay_s`` seconds after the one before it started
    (a database before the application that needs it)."""

    model_config = ConfigDict(extra="forbid")

    onboot: StrictBool = True
    order: StrictInt = 0
    delay_s: StrictInt = 0

    def check(self) -> None:
        if not 0 <= self.order <= STARTUP_ORDER_MAX:
            raise InvalidSpec(f"the start-up order must be between 0 and {STARTUP_ORDER_MAX}, not {self.order}",
                              field="startup")  # fmt: skip
        if not 0 <= self.delay_s <= STARTUP_DELAY_MAX_S:
            raise InvalidSpec(f"the start-up delay must be between 0 and {STARTUP_DELAY_MAX_S} s, not {self.delay_s}",
                              field="startup")  # fmt: skip


class VMUpdate(BaseModel):
    """What ``kasou vm set`` and ``PATCH /v1/vms/{name}`` may change on a defined VM."""

    model_config = ConfigDict(extra="forbid")

    ha: StrictBool | None = None
    priority: StrictInt | None = None
    description: str | None = Field(None, max_length=500)
    department: str | None = None  # the department whose vendor manages it ("" removes the tag)
    criticality: str | None = None  # 24h-clinical, business-hours or batch (kasou.model.criticality)
    startup: Startup | None = None  # start it when its host boots (onboot, order, delay)
    vcpus: StrictInt | None = None  # applied at the VM's next start (kasou.control.devices)
    memory_mib: StrictInt | None = None  # applied at the VM's next start
    tags: list[str] | None = None  # its tags, the whole set (kasou.model.selection)
    add_tags: list[str] | None = None  # tags to add (kasou vm tag add)
    remove_tags: list[str] | None = None  # tags to remove (kasou vm tag remove)

    @classmethod
    def parse(cls, data: Any) -> VMUpdate:
        fixed = sorted({"firmware", "tpm", "os"} & set(data)) if isinstance(data, dict) else []
        if fixed:
            raise InvalidSpec(
                f"{', '.join(fixed)} cannot change after a VM is created (its disk's boot loader, UEFI variables "
                "and TPM were made for it); make a new VM instead",
                field=fixed[0],
            )
        spec: VMUpdate = parse_model(cls, data)
        if spec.priority is not None:
            check_priority(spec.priority)
        if spec.department:
            validate_name(spec.department, "department")
        if spec.criticality is not None:
            spec.criticality = parse_criticality(spec.criticality)
        if spec.startup is not None:
            spec.startup.check()
        if spec.vcpus is not None:
            check_vcpus(spec.vcpus)
        if spec.memory_mib is not None:
            check_memory_mib(spec.memory_mib)
        for f in ("tags", "add_tags", "remove_tags"):
            if getattr(spec, f) is not None:
                setattr(spec, f, check_tags(getattr(spec, f)))
        if not spec.model_dump(exclude_none=True):
            raise InvalidSpec(
                "nothing to change: give ha, priority, description, department, criticality, startup, vcpus, "
                "memory_mib or tags",
                field="ha",
            )
        return spec

    @property
    def sizes(self) -> dict[str, int]:
        """The vCPUs and memory asked for (applied at the next start)."""
        return {k: v for k, v in (("vcpus", self.vcpus), ("memory_mib", self.memory_mib)) if v is not None}


def check_vcpus(vcpus: int) -> None:
    if not 1 <= vcpus <= MAX_VCPUS:
        raise InvalidSpec(f"vcpus must be between 1 and {MAX_VCPUS}, not {vcpus}", field="vcpus")


def check_memory_mib(memory_mib: int) -> None:
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise InvalidSpec(
            f"memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, not {memory_mib}", field="memory_mib"
        )


class VMCreate(BaseModel):
    """The request to define a VM: what ``kasou vm create`` and ``POST /v1/vms`` take."""

    model_config = ConfigDict(extra="forbid")

    name: str
    vcpus: StrictInt = Field(1)
    memory_mib: StrictInt = Field(128)
    image: str | None = None
    template: str | None = None  # --from: a linked clone of this template
    # the boot disk's size, e.g. "1G" (default: the image's); a list: the boot disk's, then one empty data disk each
    disk: str | int | list[str | int] | None = None
    start: StrictBool = False
    description: str = Field("", max_length=500)
    # shared: the disk lives where every host sees it; replicated: local, with a synchronous copy on another host
    storage: Literal["local", "shared", "replicated"] = "local"
    network: str = USER_NETWORK  # the network of its NIC: "user" (NAT) or a network made with POST /v1/networks
    anti_affinity: str | None = None  # VMs of one group never run on one host (e.g. the two EMR databases)
    ha: StrictBool = False  # high availability: restart elsewhere if its host fails, reset if its guest hangs
    priority: StrictInt = Field(50)  # HA restart order, highest first
    pool: str | None = None  # the storage pool of its disk (default: the built-in pool, or --mirror's first)
    mirror: list[str] | None = None  # RAID-1: two pools, each holding a copy kept in sync
    department: str | None = None  # e.g. "lab": that department's vendor manages it (kasou.api.permissions)
    criticality: str | None = None  # 24h-clinical, business-hours or batch; None: not stated (kasou.model.criticality)
    cpu: str | None = None  # the virtual CPU model (kasou.model.machine; default x86-64-v2-AES)
    machine: str | None = None  # a q35 machine type (default: pinned to the creating host's QEMU)
    firmware: str | None = None  # bios (default), uefi or uefi-secure (kasou.model.firmware); fixed for good
    tpm: StrictBool | None = None  # a TPM 2.0 (swtpm); default: none, but --os windows brings one
    os: str | None = None  # linux, windows or other; windows: uefi-secure, a TPM, Hyper-V, RTC in local time
    cdrom: str | None = None  # an ISO image in its CD drive (kasou.model.media); the VM keeps the drive
    boot: str | list[str] | None = None  # the firmware's boot order, e.g. "cdrom,disk" (default: disk, cdrom)
    startup: Startup | None = None  # start it when its host boots (--onboot --order N --delay S)
    cloud_init: CloudInit | None = None  # a NoCloud seed: hostname, SSH keys, address, user-data
    tags: list[str] = []  # e.g. emr, ward-a: what lists filter on and bulk actions select (kasou.model.selection)

    @classmethod
    def parse(cls, data: Any) -> VMCreate:
        """Validate raw input into a spec, raising InvalidSpec with one line."""
        spec: VMCreate = parse_model(cls, data)
        spec.check()
        return spec

    def check(self) -> None:
        """The rules that are about the spec alone (the host's limits are checked later)."""
        validate_name(self.name)
        check_vcpus(self.vcpus)
        check_memory_mib(self.memory_mib)
        if self.image is None and self.template is None and self.cdrom is None:
            raise InvalidSpec("give an image (--image), a template (--from) or an ISO to install from (--cdrom)",
                              field="image")  # fmt: skip
        if self.cdrom is not None:
            validate_name(self.cdrom, "cdrom")
            if self.image is None and self.template is None and self.disk is None:
                raise InvalidSpec("a VM installed from an ISO needs a blank disk: give its size with --disk SIZE",
                                  field="disk")  # fmt: skip
        check_boot(parse_boot(self.boot), self.cdrom is not None)
        if self.image is not None and self.template is not None:
            raise InvalidSpec("give either an image or a template, not both", field="image")
        if self.image is not None:
            validate_name(self.image, "image")
        if self.template is not None:
            validate_name(self.template, "template")
        if isinstance(self.disk, list):
            if not 1 <= len(self.disk) <= MAX_CREATE_DISKS:
                raise InvalidSpec(
                    f"give between 1 and {MAX_CREATE_DISKS} disk sizes, not {len(self.disk)}", field="disk"
                )
            if len(self.disk) > 1 and self.mirror is not None:
                raise InvalidSpec("a mirrored VM has one disk (its boot disk) for now: give one --disk", field="disk")
        for size in self.disk if isinstance(self.disk, list) else [self.disk]:
            if size is not None:
                parse_size(size, "disk")
        validate_name(self.network, "network")
        if self.anti_affinity is not None:
            validate_name(self.anti_affinity, "anti_affinity")
        check_priority(self.priority)
        if self.department is not None:
            validate_name(self.department, "department")
        if self.criticality is not None:
            self.criticality = parse_criticality(self.criticality)
        if self.pool is not None:
            validate_name(self.pool, "pool")
        if self.mirror is not None:
            if len(self.mirror) != 2:
                raise InvalidSpec(f"mirror takes two pools, not {len(self.mirror)}", field="mirror")
            for p in self.mirror:
                validate_name(p, "pool")
            if self.mirror[0] == self.mirror[1]:
                raise InvalidSpec(f"the two copies of a mirror must be in two pools, not twice in {self.mirror[0]!r}",
                                  field="mirror")  # fmt: skip
            if self.pool is not None and self.pool != self.mirror[0]:
                raise InvalidSpec("give either a pool or a mirror's two pools (the first holds the disk)", field="pool")
            if self.storage != "local":
                raise InvalidSpec(f"a mirrored disk cannot also be {self.storage}: give one of the two", field="mirror")
            if self.template is not None:
                raise InvalidSpec("a linked clone (--from) cannot be mirrored: its template's disk is shared",
                                  field="mirror")  # fmt: skip
        if self.pool is not None and self.storage != "local":
            raise InvalidSpec(f"give either a pool or storage {self.storage!r}", field="pool")
        if self.cpu is not None:
            validate_cpu(self.cpu)
        if self.machine is not None:
            validate_machine(self.machine)
        firmware, tpm, _ = resolve(self.firmware, self.tpm, self.os)
        check_storage(firmware, tpm, self.storage, self.mirror is not None)
        if self.startup is not None:
            self.startup.check()
        if self.cloud_init is not None:
            self.cloud_init.check()
        self.tags = check_tags(self.tags)

    @property
    def disk_bytes(self) -> int | None:
        """The boot disk's size (None: the image's)."""
        first = self.disk[0] if isinstance(self.disk, list) else self.disk
        return None if first is None else parse_size(first, "disk")

    @property
    def data_disks(self) -> list[int]:
        """The sizes of the empty data disks it is created with (``disk1``, ``disk2``, ...)."""
        return [parse_size(s, "disk") for s in self.disk[1:]] if isinstance(self.disk, list) else []

    @property
    def boot_list(self) -> list[str] | None:
        return parse_boot(self.boot)


def validate_vlan(vlan: object) -> int | None:
    """Return ``vlan`` if it is None or an 802.1Q VLAN id a network may use, else raise InvalidSpec."""
    if vlan is None:
        return None
    if isinstance(vlan, bool) or not isinstance(vlan, int):
        raise InvalidSpec(f"vlan must be a whole number between {VLAN_MIN} and {VLAN_MAX}", field="vlan")
    if not VLAN_MIN <= vlan <= VLAN_MAX:
        raise InvalidSpec(f"vlan must be between {VLAN_MIN} and {VLAN_MAX}, not {vlan}", field="vlan")
    return vlan


class NetworkCreate(BaseModel):
    """A named VM network (a hospital segment: clinical, imaging, mgmt), optionally on an 802.1Q VLAN.

    What ``kasou network create`` and ``POST /v1/networks`` take. On each host it becomes a
    Linux bridge; with an uplink, VLAN V reaches the wire tagged (see
    :mod:`kasou.hypervisor.qemu.network`).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    vlan: StrictInt | None = None
    description: str = Field("", max_length=500)
    departments: list[str] | None = None  # the departments whose VMs may use it (None: every department)
    isolated: bool = False  # never connected to a host's uplink (e.g. where restore drills boot restored VMs)

    @classmethod
    def parse(cls, data: Any) -> NetworkCreate:
        spec: NetworkCreate = parse_model(cls, data)
        spec.check()
        return spec

    def check(self) -> None:
        validate_network_name(self.name)
        validate_vlan(self.vlan)
        check_network_departments(self.departments)
        if self.isolated and self.vlan is not None:
            raise InvalidSpec("an isolated network never reaches the uplink: it has no VLAN", field="vlan")


class NetworkUpdate(BaseModel):
    """What ``kasou network set`` and ``PATCH /v1/networks/{name}`` change: who may use the network."""

    model_config = ConfigDict(extra="forbid")

    departments: list[str] | None  # the departments whose VMs may use it; None: every department

    @classmethod
    def parse(cls, data: Any) -> NetworkUpdate:
        spec: NetworkUpdate = parse_model(cls, data)
        check_network_departments(spec.departments)
        return spec


def check_network_departments(departments: list[str] | None) -> None:
    """A network's departments: None (every department) or one department or more, each once."""
    if departments is None:
        return
    if not departments:
        raise InvalidSpec("give at least one department, or none at all for every department", field="departments")
    for d in departments:
        validate_name(d, "department")
    if len(set(departments)) != len(departments):
        raise InvalidSpec("a department is given twice", field="departments")


def validate_network_name(name: object) -> str:
    """A network name: a safe kasou name other than the built-in ``user``."""
    validate_name(name, "network")
    assert isinstance(name, str)
    if name == USER_NETWORK:
        raise InvalidSpec(
            f"network name {USER_NETWORK!r} is taken by the built-in NAT network; choose another name",
            field="network",
        )
    return name
