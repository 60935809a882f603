"""virt-v2v for ``vm import --convert``: the domain XML kasou hands it and how its output is read."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from kasou.agent.v2v import domain_xml, parse_output
from kasou.model.imports import conversion_lines

# virt-v2v-in-place 2.2's output (stdout and stderr together) converting the debian image: its messages as it
# printed them (libguestfs names a Debian guest by its /etc/debian_version), the times made up
OUTPUT = """[   0.0] Setting up the source: -i libvirtxml /var/lib/kasou/v2v/run-deb-1a2b3c4d/domain.xml
[   1.1] Opening the source
[  42.8] Inspecting the source
[  77.0] Checking for sufficient free disk space in the guest
[  77.0] Converting 12.15 to run on KVM
virt-v2v-in-place: warning: could not determine a way to update the configuration of Grub2
virt-v2v-in-place: This guest has virtio drivers installed.
[ 301.5] Finishing off
"""


def test_the_domain_lists_every_disk_in_boot_order_as_qcow2() -> None:
    xml = domain_xml("a&b", [("/d/vm/disk0.qcow2", "qcow2"), ("/d/it's <odd>/disk1.qcow2", "qcow2")])
    root = ET.fromstring(xml)
    assert root.findtext("name") == "a&b"
    disks = root.findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == ["/d/vm/disk0.qcow2", "/d/it's <odd>/disk1.qcow2"]  # type: ignore[union-attr]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "qcow2"]  # type: ignore[union-attr]
    assert [d.find("target").get("dev") for d in disks] == ["sda", "sdb"]  # type: ignore[union-attr]


def test_what_virt_v2v_says_it_did_is_read_from_its_output() -> None:
    got = parse_output(OUTPUT)
    assert got == {
        "os": "12.15",
        "changes": [
            "converted 12.15 to run on KVM",
            "This guest has virtio drivers installed",
        ],
        "warnings": ["could not determine a way to update the configuration of Grub2"],
    }
    assert conversion_lines({**got, "seconds": 301.5}) == [
        "converted 12.15 to run on KVM",
        "This guest has virtio drivers installed",
        "warning: could not determine a way to update the configuration of Grub2",
        "virt-v2v took 301.5 s",
    ]


def test_a_guest_it_had_nothing_to_say_about_is_said_so() -> None:
    assert conversion_lines(parse_output("[   0.0] Opening the source\n")) == ["virt-v2v found nothing to change"]
