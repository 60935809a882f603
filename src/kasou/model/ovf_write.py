"""Writing the OVF descriptor of an exported VM (OVF 1.x, in the shape VMware's ovftool writes). Pure.

The hardware is described as a VMware ESXi host would expect to find it: ``vmx-13`` (ESXi 6.5 and
later), an LSI Logic SCSI controller with the disks on it in kasou's order (so disk0, the boot disk,
is SCSI 0:0), E1000 NICs (a driver every guest has) and the firmware as ``vmw:Config``. kasou reads
the same file back with :func:`kasou.model.ovf.parse_ovf`.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement, indent, register_namespace, tostring

from pydantic import BaseModel

from kasou.model.ovf import OVF1_NS, VMW_NS

RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
OS_OTHER_64 = (102, "other3xLinux64Guest", "Other Linux (64-bit)")  # CIM_OperatingSystem 102: Other 64-Bit

for _prefix, _uri in (("ovf", OVF1_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("vmw", VMW_NS)):
    register_namespace(_prefix, _uri)


class ExportDisk(BaseModel):
    href: str  # the file's name in the OVA
    file_bytes: int  # the size of that file
    capacity_bytes: int  # the disk's virtual size


class ExportNic(BaseModel):
    network: str  # the kasou network it was on (the OVF network of the same name)


class OvfExport(BaseModel):
    """What the descriptor of an exported VM says."""

    name: str
    vcpus: int
    memory_mib: int
    firmware: str = "bios"  # bios or efi
    secure_boot: bool = False  # UEFI with Secure Boot enforcing (vmw:Config uefi.secureBoot.enabled)
    description: str = ""
    disks: list[ExportDisk]
    nics: list[ExportNic] = []


def _o(name: str) -> str:
    return f"{{{OVF1_NS}}}{name}"


def _r(parent: Element, name: str, text: str) -> None:
    SubElement(parent, f"{{{RASD_NS}}}{name}").text = text


def _item(hw: Element, instance: int, rtype: int, name: str, **fields: str) -> Element:
    item = SubElement(hw, _o("Item"))
    for k, v in sorted({"ElementName": name, "InstanceID": str(instance), "ResourceType": str(rtype),
                        **fields}.items()):  # fmt: skip
        _r(item, k, v)  # rasd's elements in alphabetical order, as the CIM schema lists them
    return item


def write_ovf(spec: OvfExport) -> bytes:
    """The descriptor (UTF-8 XML) for ``spec``; its disk files are ``spec.disks[i].href`` in the OVA."""
    env = Element(_o("Envelope"))
    refs = SubElement(env, _o("References"))
    for i, d in enumerate(spec.disks, 1):
        SubElement(refs, _o("File"), {_o("href"): d.href, _o("id"): f"file{i}", _o("size"): str(d.file_bytes)})
    disks = SubElement(env, _o("DiskSection"))
    SubElement(disks, _o("Info")).text = "Virtual disk information"
    for i, d in enumerate(spec.disks, 1):
        SubElement(disks, _o("Disk"), {
            _o("capacity"): str(d.capacity_bytes), _o("capacityAllocationUnits"): "byte",
            _o("diskId"): f"vmdisk{i}", _o("fileRef"): f"file{i}", _o("format"): STREAM_OPTIMIZED,
        })  # fmt: skip
    networks = list(dict.fromkeys(n.network for n in spec.nics))
    if networks:
        net = SubElement(env, _o("NetworkSection"))
        SubElement(net, _o("Info")).text = "The list of logical networks"
        for n in networks:
            SubElement(SubElement(net, _o("Network"), {_o("name"): n}), _o("Description")).text = f"kasou network {n}"
    vs = SubElement(env, _o("VirtualSystem"), {_o("id"): spec.name})
    SubElement(vs, _o("Info")).text = "A virtual machine exported by kasou"
    SubElement(vs, _o("Name")).text = spec.name
    os_id, os_type, os_text = OS_OTHER_64
    oss = SubElement(vs, _o("OperatingSystemSection"), {_o("id"): str(os_id), f"{{{VMW_NS}}}osType": os_type})
    SubElement(oss, _o("Info")).text = "The kind of installed guest operating system"
    SubElement(oss, _o("Description")).text = os_text
    if spec.description:
        ann = SubElement(vs, _o("AnnotationSection"))
        SubElement(ann, _o("Info")).text = "A human-readable annotation"
        SubElement(ann, _o("Annotation")).text = spec.description
    hw = SubElement(vs, _o("VirtualHardwareSection"))
    SubElement(hw, _o("Info")).text = "Virtual hardware requirements"
    system = SubElement(hw, _o("System"))
    for k, v in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                 ("VirtualSystemIdentifier", spec.name), ("VirtualSystemType", "vmx-13")):  # fmt: skip
        SubElement(system, f"{{{VSSD_NS}}}{k}").text = v
    _item(hw, 1, 3, f"{spec.vcpus} virtual CPU(s)", AllocationUnits="hertz * 10^6",
          Description="Number of Virtual CPUs", VirtualQuantity=str(spec.vcpus))  # fmt: skip
    _item(hw, 2, 4, f"{spec.memory_mib}MB of memory", AllocationUnits="byte * 2^20", Description="Memory Size",
          VirtualQuantity=str(spec.memory_mib))  # fmt: skip
    _item(hw, 3, 6, "scsiController0", Address="0", Description="SCSI Controller", ResourceSubType="lsilogic")
    instance = 4
    for i, _d in enumerate(spec.disks):
        _item(hw, instance, 17, f"disk{i}", AddressOnParent=str(i), HostResource=f"ovf:/disk/vmdisk{i + 1}",
              Parent="3")  # fmt: skip
        instance += 1
    for i, nic in enumerate(spec.nics):
        _item(hw, instance, 10, f"ethernet{i}", AddressOnParent=str(7 + i), AutomaticAllocation="true",
              Connection=nic.network, Description=f"E1000 ethernet adapter on {nic.network!r}",
              ResourceSubType="E1000")  # fmt: skip
        instance += 1
    SubElement(hw, f"{{{VMW_NS}}}Config", {_o("required"): "false", f"{{{VMW_NS}}}key": "firmware",
                                            f"{{{VMW_NS}}}value": spec.firmware})  # fmt: skip
    if spec.secure_boot:
        SubElement(hw, f"{{{VMW_NS}}}Config", {_o("required"): "false", f"{{{VMW_NS}}}key": "uefi.secureBoot.enabled",
                                                f"{{{VMW_NS}}}value": "TRUE"})  # fmt: skip
    indent(env)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + tostring(env, encoding="utf-8", xml_declaration=False) + b"\n"
