"""OVF descriptors (DMTF DSP0243 1.x and 2.x, as VMware's ovftool writes them): read into models. Pure.

A descriptor comes from outside (an appliance from a vendor, an export of another hospital's
VMware): it is untrusted XML. It is parsed with ``defusedxml``, which refuses document type
declarations, entities and external references (no "billion laughs", no file or network reads),
after a bound on its size; every string taken from it is cut short and freed of control characters
before it can reach a report or a terminal.

What is read (element and attribute names are matched by their local names, so OVF 1.x's
``Item`` and 2.x's ``StorageItem``/``EthernetPortItem`` read alike)::

    Envelope
      References/File           id, href, size, compression, chunkSize
      DiskSection/Disk          diskId, fileRef, capacity (+ capacityAllocationUnits), format, parentRef
      NetworkSection/Network    name
      VirtualSystem             id, Name
        OperatingSystemSection  id, vmw:osType
        VirtualHardwareSection  System/VirtualSystemType, Item (ResourceType 3 CPU, 4 memory, 17 disk,
                                10 NIC, 5/6/20 controllers, ...), vmw:Config key/value (firmware=efi,
                                uefi.secureBoot.enabled)

How the hardware maps onto a kasou VM, and what is refused, is :mod:`kasou.model.imports`.
"""

from __future__ import annotations

import re
from typing import Any
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from pydantic import BaseModel

from kasou.errors import InvalidSpec

OVF1_NS = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2_NS = "http://schemas.dmtf.org/ovf/envelope/2"
VMW_NS = "http://www.vmware.com/schema/ovf"
MAX_DESCRIPTOR_BYTES = 4 * 1024 * 1024  # ovftool's descriptors are a few KiB; one of MiB is no appliance
MAX_ITEMS = 512
TEXT_MAX = 200

# CIM_ResourceAllocationSettingData.ResourceType (DSP0243, the CIM schema): the names a report shows.
RESOURCE_TYPES = {
    1: "other device", 2: "computer system", 3: "processor", 4: "memory", 5: "IDE controller",
    6: "SCSI controller", 7: "FC HBA", 8: "iSCSI HBA", 9: "InfiniBand HCA", 10: "Ethernet adapter",
    11: "other network adapter", 12: "I/O slot", 13: "I/O device", 14: "floppy drive", 15: "CD drive",
    16: "DVD drive", 17: "disk drive", 18: "tape drive", 19: "storage extent", 20: "SATA controller",
    21: "serial port", 22: "parallel port", 23: "USB controller", 24: "graphics controller",
    25: "IEEE 1394 controller", 26: "partitionable unit", 27: "base partitionable unit", 28: "power",
    29: "cooling capacity", 30: "Ethernet switch port", 31: "logical disk", 32: "storage volume",
    33: "Ethernet connection", 35: "sound card",
}  # fmt: skip

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: str | None) -> str | None:
    """A string from the descriptor, safe to show: no control characters, at most TEXT_MAX characters."""
    if text is None:
        return None
    t = _CONTROL.sub(" ", text).strip()
    return t[:TEXT_MAX] + ("..." if len(t) > TEXT_MAX else "")


class OvfFile(BaseModel):
    id: str
    href: str
    size: int | None = None
    compression: str | None = None  # gzip (refused: ovftool writes none)
    chunk_size: int | None = None  # a file split into chunks (refused)


class OvfDisk(BaseModel):
    disk_id: str
    file_ref: str | None = None  # None: an empty disk of ``capacity_bytes``
    capacity_bytes: int | None = None
    format: str | None = None  # a URL, e.g. ...vmdk.html#streamOptimized
    parent_ref: str | None = None  # a delta disk over another (refused)


class OvfItem(BaseModel):
    """One device of the virtual hardware (an ``Item``, ``StorageItem`` or ``EthernetPortItem``)."""

    instance_id: str = ""
    resource_type: int | None = None
    subtype: str | None = None  # ResourceSubType: lsilogic, vmware.sata.ahci, E1000e, VmxNet3, ...
    name: str | None = None  # ElementName
    quantity: int | None = None  # VirtualQuantity
    units: str | None = None  # AllocationUnits
    host_resource: str | None = None  # ovf:/disk/ID, ovf:/file/ID
    parent: str | None = None  # the InstanceID of its controller
    address: str | None = None  # a controller's bus number (SCSI 0 in VMware's "SCSI 0:1")
    address_on_parent: str | None = None
    connection: str | None = None  # a NIC's OVF network
    required: bool = True  # ovf:required="false": a deployment may leave it out

    @property
    def kind(self) -> str:
        """What it is, for people: ``SCSI controller 'scsiController0'``."""
        what = RESOURCE_TYPES.get(self.resource_type or 0, f"ResourceType {self.resource_type}")
        return f"{what} {self.name!r}" if self.name else what


class OvfSystem(BaseModel):
    id: str | None = None
    name: str | None = None
    system_type: str | None = None  # vmx-13, ...
    os_id: int | None = None  # CIM_OperatingSystem's number (96: Debian 64-bit, ...)
    os_type: str | None = None  # vmw:osType (debian10_64Guest, windows2019srv_64Guest, ...)
    os_description: str | None = None
    firmware: str = "bios"  # vmw:Config firmware: bios or efi
    secure_boot: bool = False  # vmw:Config uefi.secureBoot.enabled
    items: list[OvfItem] = []


class OvfEnvelope(BaseModel):
    version: str  # 1 or 2: the envelope's namespace
    files: list[OvfFile] = []
    disks: list[OvfDisk] = []
    networks: list[str] = []
    systems: list[OvfSystem] = []  # one VirtualSystem; several only in a VirtualSystemCollection (refused)
    collection: bool = False  # a VirtualSystemCollection (a vApp of several VMs)

    def file(self, file_id: str) -> OvfFile | None:
        return next((f for f in self.files if f.id == file_id), None)

    def disk(self, disk_id: str) -> OvfDisk | None:
        return next((d for d in self.disks if d.disk_id == disk_id), None)


# -- helpers on the element tree ------------------------------------------------------------------


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _ns(name: str) -> str:
    return name[1:].split("}", 1)[0] if name.startswith("{") else ""


def _attr(el: Element, name: str) -> str | None:
    """An attribute by its local name (``ovf:id``, ``vmw:key``, or unqualified)."""
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return None


def _children(el: Element, name: str) -> list[Element]:
    return [c for c in el if _local(c.tag) == name]


def _child(el: Element, name: str) -> Element | None:
    found = _children(el, name)
    return found[0] if found else None


def _text(el: Element, name: str) -> str | None:
    c = _child(el, name)
    return clean(c.text) if c is not None and c.text is not None else None


def _int(value: str | None, what: str) -> int | None:
    if value is None or not value.strip():
        return None
    v = value.strip()
    if not re.fullmatch(r"\d{1,20}", v):
        raise InvalidSpec(f"the OVF descriptor's {what} is {clean(v)!r}, not a whole number", field="ovf")
    return int(v)


_BYTE_UNITS = re.compile(r"byte(?:\*(\d{1,4})\^(\d{1,3}))?")
_NAMED_UNITS = {"bytes": 1, "kilobytes": 1024, "kb": 1024, "megabytes": 1024**2, "mb": 1024**2,
                "gigabytes": 1024**3, "gb": 1024**3, "terabytes": 1024**4, "tb": 1024**4}  # fmt: skip


def unit_bytes(units: str | None) -> int | None:
    """The bytes one unit stands for (DSP0004's programmatic units as VMware writes them: ``byte * 2^20``,
    or a name such as ``MegaBytes``); None if the text says something else."""
    if units is None:
        return None
    t = re.sub(r"\s+", "", units).lower()
    m = _BYTE_UNITS.fullmatch(t)
    if m:
        if m.group(1) is None:
            return 1
        factor = int(m.group(1)) ** int(m.group(2))
        return factor if 0 < factor <= 1024**5 else None
    return _NAMED_UNITS.get(t)


# -- parsing ----------------------------------------------------------------------------------------


def parse_ovf(data: bytes) -> OvfEnvelope:
    """Read an OVF descriptor; InvalidSpec (one line) if it is not one or cannot be read safely."""
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise InvalidSpec(f"the OVF descriptor is {len(data)} bytes long; kasou reads at most "
                          f"{MAX_DESCRIPTOR_BYTES}", field="ovf")  # fmt: skip
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise InvalidSpec(f"the OVF descriptor is refused: {type(e).__name__} (it declares a DTD or "
                          "entities)", field="ovf") from None  # fmt: skip
    except ParseError as e:
        raise InvalidSpec(f"the OVF descriptor is not valid XML: {clean(str(e))}", field="ovf") from None
    ns = _ns(root.tag)
    if _local(root.tag) != "Envelope" or ns not in (OVF1_NS, OVF2_NS):
        what = "an OVF 0.9 envelope (not supported)" if "vmware.com/schema/ovf/1/envelope" in ns else \
            f"<{clean(_local(root.tag))}> in namespace {clean(ns) or '(none)'!r}"  # fmt: skip
        raise InvalidSpec(f"not an OVF 1.x or 2.x descriptor: its root element is {what}", field="ovf")
    env = OvfEnvelope(version="1" if ns == OVF1_NS else "2")
    refs = _child(root, "References")
    for f in _children(refs, "File") if refs is not None else []:
        env.files.append(OvfFile(
            id=clean(_attr(f, "id")) or "", href=_attr(f, "href") or "", size=_int(_attr(f, "size"), "file size"),
            compression=clean(_attr(f, "compression")), chunk_size=_int(_attr(f, "chunkSize"), "chunk size"),
        ))  # fmt: skip
    for section in _children(root, "DiskSection"):
        for d in _children(section, "Disk"):
            env.disks.append(_disk(d))
    for section in _children(root, "NetworkSection"):
        env.networks += [clean(_attr(n, "name")) or "" for n in _children(section, "Network")]
    systems = _children(root, "VirtualSystem")
    collections = _children(root, "VirtualSystemCollection")
    if collections:
        env.collection = True
        for c in collections:
            systems += [s for s in c.iter() if _local(s.tag) == "VirtualSystem"]
    env.systems = [_system(s) for s in systems]
    if sum(len(s.items) for s in env.systems) > MAX_ITEMS:
        raise InvalidSpec(f"the OVF descriptor lists more than {MAX_ITEMS} devices", field="ovf")
    return env


def _disk(d: Element) -> OvfDisk:
    capacity = _int(_attr(d, "capacity"), "disk capacity")
    units_text = _attr(d, "capacityAllocationUnits")
    unit = unit_bytes(units_text) if units_text is not None else 1
    if unit is None:
        raise InvalidSpec(f"the OVF disk {clean(_attr(d, 'diskId'))!r} gives its capacity in "
                          f"{clean(units_text)!r}, which kasou cannot read", field="ovf")  # fmt: skip
    return OvfDisk(
        disk_id=clean(_attr(d, "diskId")) or "",
        file_ref=clean(_attr(d, "fileRef")),
        capacity_bytes=capacity * unit if capacity is not None else None,
        format=clean(_attr(d, "format")),
        parent_ref=clean(_attr(d, "parentRef")),
    )


def _system(vs: Element) -> OvfSystem:
    sysm = OvfSystem(id=clean(_attr(vs, "id")), name=_text(vs, "Name"))
    os_section = _child(vs, "OperatingSystemSection")
    if os_section is not None:
        sysm.os_id = _int(_attr(os_section, "id"), "operating system id")
        sysm.os_type = clean(_attr(os_section, "osType"))
        sysm.os_description = _text(os_section, "Description")
    hw = _child(vs, "VirtualHardwareSection")
    if hw is None:
        return sysm
    system = _child(hw, "System")
    if system is not None:
        sysm.system_type = _text(system, "VirtualSystemType")
    for el in hw:
        tag = _local(el.tag)
        if tag in ("Item", "StorageItem", "EthernetPortItem"):
            if len(sysm.items) >= MAX_ITEMS:
                raise InvalidSpec(f"the OVF descriptor lists more than {MAX_ITEMS} devices", field="ovf")
            sysm.items.append(_item(el))
        elif tag in ("Config", "ExtraConfig") and _ns(el.tag) == VMW_NS:
            _vmw_config(sysm, (_attr(el, "key") or "").strip(), (_attr(el, "value") or "").strip())
    return sysm


def _vmw_config(sysm: OvfSystem, key: str, value: str) -> None:
    """VMware's settings that matter to a guest's boot (ovftool writes them as ``vmw:Config``)."""
    if key == "firmware":
        sysm.firmware = "efi" if value.lower() == "efi" else "bios"
    elif key == "uefi.secureBoot.enabled":
        sysm.secure_boot = value.lower() == "true"


def _item(el: Element) -> OvfItem:
    fields: dict[str, Any] = {}
    for c in el:
        name = _local(c.tag)
        if name not in fields and c.text is not None:  # HostResource may repeat: the first one counts
            fields[name] = c.text
    required = (_attr(el, "required") or "true").strip().lower() != "false"
    return OvfItem(
        instance_id=clean(fields.get("InstanceID")) or "",
        resource_type=_int(fields.get("ResourceType"), "ResourceType"),
        subtype=clean(fields.get("ResourceSubType")),
        name=clean(fields.get("ElementName")),
        quantity=_int(fields.get("VirtualQuantity"), "VirtualQuantity"),
        units=clean(fields.get("AllocationUnits")),
        host_resource=clean(fields.get("HostResource")),
        parent=clean(fields.get("Parent")),
        address=clean(fields.get("Address")),
        address_on_parent=clean(fields.get("AddressOnParent")),
        connection=clean(fields.get("Connection")),
        required=required,
    )
