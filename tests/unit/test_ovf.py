"""OVF descriptors as VMware writes them: reading them safely, mapping them onto a VM, writing them back."""

from __future__ import annotations

import pytest

from kasou.agent.ova import check_member_name, parse_manifest
from kasou.agent.sources import DESCRIPTOR, sniff
from kasou.errors import InvalidSpec
from kasou.model.imports import ImportSource, SourceDisk, VMImport, check_firmware, plan_import
from kasou.model.ovf import parse_ovf, unit_bytes
from kasou.model.ovf_write import ExportDisk, ExportNic, OvfExport, write_ovf
from tests.ovf_samples import SERIAL_PORT, TAPE_DRIVE, Disk, vmware_ovf

GIB = 1 << 30


def source(ovf: str, sizes: dict[str, int] | None = None, kind: str = "ova") -> ImportSource:
    """What an agent would have found: each disk of the descriptor present, of the given virtual size."""
    env = parse_ovf(ovf.encode())
    found = {}
    for d in env.disks:
        f = env.file(d.file_ref) if d.file_ref else None
        if f is not None:
            size = (sizes or {}).get(d.disk_id, d.capacity_bytes or GIB)
            found[d.disk_id] = SourceDisk(file=f.href, path="/x.ova", member=f.href, offset=512, length=1,
                                          format="vmdk", subformat="streamOptimized", virtual_size=size,
                                          file_bytes=1)  # fmt: skip
    return ImportSource(kind=kind, file="emr-db.ova", ovf=env, ovf_disks=found)  # type: ignore[arg-type]


def plan(ovf: str, **req: object) -> object:
    return plan_import(VMImport(name="emr-db", ova="emr-db.ova", **req), source(ovf))  # type: ignore[arg-type]


# -- reading ---------------------------------------------------------------------------------------------


def test_an_ovftool_descriptor_is_read_with_its_vmware_settings() -> None:
    env = parse_ovf(vmware_ovf(disks=[Disk("a.vmdk", 123, 16), Disk("b.vmdk", 45, 0.5)], cpus=4,
                               memory_mib=6144, nics=("VM Network", "PACS"), firmware="efi",
                               secure_boot=True).encode())  # fmt: skip
    assert env.version == "1" and not env.collection
    assert [(f.id, f.href, f.size) for f in env.files] == [("file1", "a.vmdk", 123), ("file2", "b.vmdk", 45)]
    assert [(d.disk_id, d.file_ref, d.capacity_bytes) for d in env.disks] == [
        ("vmdisk1", "file1", 16 * GIB), ("vmdisk2", "file2", GIB // 2)]  # fmt: skip
    assert env.disks[0].format is not None and env.disks[0].format.endswith("#streamOptimized")
    assert env.networks == ["VM Network", "PACS"]
    (vs,) = env.systems
    assert (vs.id, vs.name, vs.system_type) == ("emr-db", "emr-db", "vmx-19")
    assert (vs.os_id, vs.os_type) == (96, "debian11_64Guest")
    assert vs.firmware == "efi" and vs.secure_boot
    types = [it.resource_type for it in vs.items]
    assert types == [3, 4, 20, 23, 6, 17, 17, 15, 10, 10, 24, 1]
    cpu, mem = vs.items[0], vs.items[1]
    assert (cpu.quantity, mem.quantity, mem.units) == (4, 6144, "byte * 2^20")
    usb = vs.items[3]
    assert not usb.required and usb.subtype == "vmware.usb.ehci" and usb.kind == "USB controller 'USB controller'"
    disk = vs.items[5]
    assert (disk.host_resource, disk.parent, disk.address_on_parent) == ("ovf:/disk/vmdisk1", "6", "0")
    nic = vs.items[8]
    assert (nic.subtype, nic.connection) == ("E1000e", "VM Network")


OVF2 = """<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
  xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2">
  <References><File ovf:id="f1" ovf:href="sys.vmdk"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="20" ovf:capacityAllocationUnits="byte * 2^30"/>
    <Disk ovf:diskId="d2" ovf:capacity="10737418240"/>
  </DiskSection>
  <VirtualSystem ovf:id="pacs">
    <Info>a VM</Info>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:ElementName>cpu</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>8</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>16</rasd:VirtualQuantity></Item>
      <Item><rasd:ElementName>ide0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType><rasd:Address>1</rasd:Address></Item>
      <StorageItem><sasd:AddressOnParent>1</sasd:AddressOnParent><sasd:ElementName>data</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/d2</sasd:HostResource><sasd:InstanceID>4</sasd:InstanceID>
        <sasd:Parent>3</sasd:Parent><sasd:ResourceType>17</sasd:ResourceType></StorageItem>
      <StorageItem><sasd:AddressOnParent>0</sasd:AddressOnParent><sasd:ElementName>system</sasd:ElementName>
        <sasd:HostResource>ovf:/disk/d1</sasd:HostResource><sasd:InstanceID>5</sasd:InstanceID>
        <sasd:Parent>3</sasd:Parent><sasd:ResourceType>17</sasd:ResourceType></StorageItem>
      <EthernetPortItem><epasd:Connection>imaging</epasd:Connection><epasd:ElementName>eth0</epasd:ElementName>
        <epasd:InstanceID>6</epasd:InstanceID><epasd:ResourceType>10</epasd:ResourceType></EthernetPortItem>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"""


def test_an_ovf_2_descriptor_with_storage_and_ethernet_port_items_maps() -> None:
    env = parse_ovf(OVF2.encode())
    assert env.version == "2"
    p = plan_import(VMImport(name="pacs", ovf="pacs.ovf"), source(OVF2, kind="ovf"))
    assert (p.vcpus, p.memory_mib, p.firmware) == (8, 16384, "bios")
    assert [(d.id, d.size_bytes, d.source is None) for d in p.disks] == [("disk0", 20 * GIB, False),
                                                                         ("disk1", 10 * GIB, True)]  # fmt: skip
    assert p.disks[0].origin == "sys.vmdk (vmdk streamOptimized, 20 GiB) at IDE 1:0"
    assert p.disks[1].origin == "empty disk d2 at IDE 1:1"
    assert [n.origin for n in p.nics] == ["Ethernet adapter 'eth0' on OVF network 'imaging'"]
    assert p.controllers == ["IDE controller 'ide0'"]


@pytest.mark.parametrize(
    "doc, says",
    [
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><x>&b;</x>', "refused"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/shadow">]><x>&e;</x>', "refused"),
        (b"<?xml version='1.0'?><!DOCTYPE Envelope SYSTEM 'http://example.com/x.dtd'><Envelope/>", "refused"),
        (b"not xml at all", "not valid XML"),
        (b"<Envelope xmlns='http://example.com/other'/>", "root element is <Envelope> in namespace"),
        (b"<Envelope xmlns='http://www.vmware.com/schema/ovf/1/envelope'/>", "an OVF 0.9 envelope"),
        (b"<a:Envelope/>", "not valid XML: unbound prefix"),
    ],
)
def test_hostile_or_foreign_xml_is_refused_in_one_line(doc: bytes, says: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        parse_ovf(doc)
    assert says in e.value.message and "\n" not in e.value.message, e.value.message


def test_a_huge_descriptor_or_too_many_devices_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="at most"):
        parse_ovf(b" " * (5 << 20))
    items = "".join(f"<Item><rasd:InstanceID>{i}</rasd:InstanceID><rasd:ResourceType>1</rasd:ResourceType></Item>"
                    for i in range(600))  # fmt: skip
    doc = vmware_ovf(extra_items=items)
    with pytest.raises(InvalidSpec, match="more than 512 devices"):
        parse_ovf(doc.encode())


def test_strings_from_the_descriptor_are_safe_to_print() -> None:
    doc = vmware_ovf(name="emr&#155;[31mRED&#10;&#13;" + "x" * 300)  # CSI (a C1 control XML allows), newlines
    vs = parse_ovf(doc.encode()).systems[0]
    assert vs.name is not None and vs.name.startswith("emr [31mRED")
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in vs.name) and len(vs.name) <= 203


@pytest.mark.parametrize(
    "units, factor",
    [("byte", 1), ("byte * 2^20", 1 << 20), ("byte*2^30", 1 << 30), ("byte * 10^6", 10**6), ("MegaBytes", 1 << 20),
     ("GB", 1 << 30), ("hertz * 10^6", None), ("byte * 2^999", None), ("furlongs", None)],
)  # fmt: skip
def test_allocation_units(units: str, factor: int | None) -> None:
    assert unit_bytes(units) == factor


# -- mapping --------------------------------------------------------------------------------------------


def test_a_vmware_vm_maps_with_disks_in_controller_order_and_a_report() -> None:
    disks = [Disk("data.vmdk", 1, 100, "scsi", 1), Disk("sys.vmdk", 1, 40, "scsi", 0), Disk("sata.vmdk", 1, 1, "sata")]
    p = plan(vmware_ovf(disks=disks, cpus=4, memory_mib=8192))
    assert (p.vcpus, p.vcpus_from, p.memory_mib, p.memory_from) == (4, "the OVF", 8192, "the OVF")  # type: ignore[attr-defined]
    # the SATA controller comes first in the descriptor, then SCSI 0:0, SCSI 0:1
    assert [d.source.file for d in p.disks] == ["sata.vmdk", "sys.vmdk", "data.vmdk"]  # type: ignore[attr-defined]
    report = p.report()  # type: ignore[attr-defined]
    assert report[0] == "source    emr-db.ova"
    assert "disk1     sys.vmdk (vmdk streamOptimized, 40 GiB) at SCSI 0:0 -> qcow2, 40 GiB, virtio" in report
    assert "left out  graphics controller 'Video card'" in report
    assert "note      disks in the order of their controllers and addresses; disk0 is the boot disk" in report


def test_what_is_given_overrides_the_ovf_and_says_so() -> None:
    p = plan(vmware_ovf(cpus=4, memory_mib=8192), vcpus=2, memory_mib=1024, network="clinical")
    assert (p.vcpus, p.vcpus_from) == (2, "given; the OVF says 4")  # type: ignore[attr-defined]
    assert (p.memory_mib, p.memory_from) == (1024, "given; the OVF says 8192 MiB")  # type: ignore[attr-defined]
    assert [n.network for n in p.nics] == ["clinical"]  # type: ignore[attr-defined]


def test_everything_that_cannot_be_mapped_is_listed_in_one_refusal() -> None:
    cd = """      <Item>
        <rasd:ElementName>CD/DVD drive 2</rasd:ElementName>
        <rasd:HostResource>ovf:/file/file9</rasd:HostResource>
        <rasd:InstanceID>70</rasd:InstanceID>
        <rasd:ResourceType>15</rasd:ResourceType>
      </Item>
"""
    optional_port = SERIAL_PORT.replace("<Item>", '<Item ovf:required="false">').replace(">60<", ">62<")
    with pytest.raises(InvalidSpec) as e:
        plan(vmware_ovf(extra_items=SERIAL_PORT + TAPE_DRIVE + cd + optional_port))
    assert e.value.message == (
        "cannot import 'emr-db' from emr-db.ova: serial port 'Serial port 1' (ResourceType 21) has no counterpart "
        "in kasou; tape drive 'Tape drive 1' (ResourceType 18) has no counterpart in kasou; CD drive 'CD/DVD "
        "drive 2' holds ovf:/file/file9: kasou does not attach CD, DVD or floppy images yet"
    )
    p = plan(vmware_ovf(extra_items=optional_port))  # an optional one is left out, and said so
    assert "left out  serial port 'Serial port 1' (optional in the OVF)" in p.report()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change, says",
    [
        (('ovf:size="1000"', 'ovf:size="1000" ovf:compression="gzip"'), "is compressed (gzip)"),
        (('ovf:size="1000"', 'ovf:size="1000" ovf:chunkSize="100"'), "is split in chunks"),
        (('ovf:fileRef="file1"', 'ovf:fileRef="file1" ovf:parentRef="vmdisk0"'), "is a delta of disk 'vmdisk0'"),
        (("ovf:/disk/vmdisk1", "ovf:/disk/nowhere"), "refers to disk 'nowhere', which the DiskSection does not list"),
        (('<VirtualSystem ovf:id="emr-db">', '<VirtualSystemCollection><VirtualSystem ovf:id="emr-db">'), None),
        (("<rasd:AllocationUnits>byte * 2^20", "<rasd:AllocationUnits>pages"), "memory given in 'pages'"),
        (
            ("<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>999</rasd:VirtualQuantity>"),
            "999 vCPUs (kasou runs 1 to 255)",
        ),
    ],
)
def test_packages_kasou_cannot_map_are_refused(change: tuple[str, str], says: str | None) -> None:
    doc = vmware_ovf().replace(*change, 1)
    if says is None:  # a vApp of several VMs
        doc = doc.replace("</VirtualSystem>", "</VirtualSystem></VirtualSystemCollection>")
        says = "it describes 1 virtual systems (a vApp); kasou imports one VM at a time"
    with pytest.raises(InvalidSpec) as e:
        plan(doc)
    assert says in e.value.message, e.value.message


def test_a_disk_whose_file_was_not_found_is_refused() -> None:
    src = source(vmware_ovf())
    src.ovf_disks.clear()
    with pytest.raises(InvalidSpec, match=r"disk 'vmdisk1': its file 'emr-db-disk1\.vmdk' was not found"):
        plan_import(VMImport(name="x", ova="x.ova"), src)


def test_uefi_from_the_ovf_is_mapped_with_its_secure_boot() -> None:
    p = plan(vmware_ovf(firmware="efi", secure_boot=True))
    assert p.firmware == "uefi-secure"  # type: ignore[attr-defined]
    assert "firmware  UEFI with Secure Boot (the OVF: vmw:Config firmware=efi, Secure Boot)" in p.report()  # type: ignore[attr-defined]
    assert plan(vmware_ovf(firmware="efi")).firmware == "uefi"  # type: ignore[attr-defined]
    assert plan(vmware_ovf(firmware="efi"), firmware="bios").firmware == "bios"  # type: ignore[attr-defined]
    small = plan(vmware_ovf(firmware="efi"), memory_mib=128)
    with pytest.raises(InvalidSpec, match="UEFI needs at least 256 MiB"):
        check_firmware(VMImport(name="x", ova="x.ova"), small)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body, says",
    [
        ({"name": "x"}, "give the disk files (--disk, once per disk), an OVA (--ova) or an OVF (--ovf)"),
        ({"name": "x", "disks": ["a"], "ova": "b.ova"}, "one of the three"),
        ({"name": "x", "disks": [""]}, "is not a usable path"),
        ({"name": "x", "disks": ["a"] * 17}, "at most 16 disks"),
        ({"name": "x", "ova": "a.ova", "vcpus": 0}, "vcpus must be between 1 and 255"),
        ({"name": "x", "ova": "a.ova", "firmware": "efi"}, "firmware"),
        ({"name": "../x", "ova": "a.ova"}, "must not contain '..'"),
    ],
)
def test_import_requests_are_checked(body: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        VMImport.parse(body)
    assert says in e.value.message, e.value.message


# -- writing, and the archive's pieces ----------------------------------------------------------------


def test_a_written_descriptor_reads_back_as_the_same_vm() -> None:
    doc = write_ovf(OvfExport(name="ris", vcpus=2, memory_mib=3072, description="radiology <RIS> & co",
                              disks=[ExportDisk(href="ris-disk0.vmdk", file_bytes=10, capacity_bytes=GIB),
                                     ExportDisk(href="ris-disk1.vmdk", file_bytes=5, capacity_bytes=2 * GIB)],
                              nics=[ExportNic(network="imaging"), ExportNic(network="mgmt")]))  # fmt: skip
    assert doc.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<ovf:Envelope')
    env = parse_ovf(doc)
    assert env.networks == ["imaging", "mgmt"]
    src = ImportSource(kind="ova", file="ris.ova", ovf=env, ovf_disks={
        f"vmdisk{i}": SourceDisk(file=f"ris-disk{i - 1}.vmdk", path="/r.ova", member="m", offset=0, length=1,
                                 format="vmdk", virtual_size=s, file_bytes=1)
        for i, s in ((1, GIB), (2, 2 * GIB))})  # fmt: skip
    p = plan_import(VMImport(name="ris2", ova="ris.ova"), src)
    assert (p.vcpus, p.memory_mib, p.firmware) == (2, 3072, "bios")
    assert [d.source.file for d in p.disks if d.source] == ["ris-disk0.vmdk", "ris-disk1.vmdk"]
    assert [n.origin for n in p.nics] == ["E1000 Ethernet adapter 'ethernet0' on OVF network 'imaging'",
                                          "E1000 Ethernet adapter 'ethernet1' on OVF network 'mgmt'"]  # fmt: skip


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\..\\b", ""])
def test_member_names_that_leave_the_archive_are_refused(name: str) -> None:
    with pytest.raises(InvalidSpec, match="would land outside"):
        check_member_name(name, "x.ova")


def test_member_names_are_normalised() -> None:
    assert check_member_name("./disk.vmdk", "x.ova") == "disk.vmdk"
    assert check_member_name("dir/disk.vmdk", "x.ova") == "dir/disk.vmdk"


def test_manifests_are_read_and_checked() -> None:
    sha256 = "a" * 64
    m = parse_manifest(f"SHA256(x.ovf)= {sha256}\nSHA1(d.vmdk)={'B' * 40}\n\n".encode(), "x.ova")
    assert m == {"x.ovf": ("sha256", sha256), "d.vmdk": ("sha1", "b" * 40)}
    with pytest.raises(InvalidSpec, match="has a line kasou cannot read"):
        parse_manifest(b"MD5(x.ovf)= 00\n", "x.ova")
    with pytest.raises(InvalidSpec, match="has the wrong length"):
        parse_manifest(f"SHA256(x.ovf)= {'a' * 40}\n".encode(), "x.ova")


@pytest.mark.parametrize(
    "head, tail, fmt",
    [
        (b"QFI\xfb\x00\x00\x00\x03", b"", "qcow2"),
        (b"KDMV\x01\x00\x00\x00", b"", "vmdk"),
        (b"# Disk DescriptorFile\nversion=1\n", b"", DESCRIPTOR),
        (b"vhdxfile", b"", "vhdx"),
        (b"conectix", b"", "vpc"),
        (b"\x00" * 512, b"conectix" + b"\x00" * 504, "vpc"),  # a fixed VHD: its footer at the end only
        (b"\xeb\x63\x90" + b"\x00" * 509, b"\x00" * 510 + b"\x55\xaa", "raw"),
    ],
)
def test_formats_are_told_by_their_magic(head: bytes, tail: bytes, fmt: str) -> None:
    assert sniff(head, tail) == fmt
