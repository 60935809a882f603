"""cloud-init's NoCloud seed: what is accepted, what the seed says, and the disk QEMU gets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kasou.errors import InvalidSpec
from kasou.hypervisor.qemu import seed
from kasou.model.cloudinit import CloudInit, meta_data, network_config, summary, user_data
from kasou.model.spec import NicSpec, VMCreate

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0cLnH5xpKh0V2mZ7+Jfj2n3l3k4Z7J2Uq0o6Tz0K9r it@hospital"


@pytest.mark.parametrize(
    "ci, says",
    [
        ({"hostname": "-bad"}, "is not a host name"),
        ({"hostname": "a" * 64}, "is not a host name"),
        ({"ssh_keys": ["not a key"]}, "is not an OpenSSH public key"),
        ({"ssh_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----\nxx"]}, "is not an OpenSSH public key"),
        ({"ip": "10.0.0.300/24"}, "is not an address with its prefix"),
        ({"ip": "10.0.0.5"}, "needs its prefix length"),
        ({"ip": "10.0.0.5/24", "gateway": "10.0.1.1"}, "is not in 10.0.0.0/24"),
        ({"gateway": "10.0.0.1"}, "go with --ip"),
        ({"ip": "10.0.0.5/24", "dns": ["dns.local"]}, "is not an IP address"),
        ({"user_data": "users: []"}, "must be cloud-init's"),
        ({"user_data": "#cloud-config\n" + "x" * 70000}, "larger than 64 KiB"),
    ],
)
def test_bad_seeds_are_refused_with_one_line(ci: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        VMCreate.parse({"name": "emr", "image": "debian", "cloud_init": ci})
    assert says in e.value.message and "\n" not in e.value.message, e.value.message


def test_the_seed_names_the_vm_its_keys_and_its_address() -> None:
    ci = CloudInit(hostname="emr-db1", ssh_keys=[KEY], ip="10.20.0.15/24", gateway="10.20.0.1", dns=["10.20.0.2"])
    ci.check()
    md = json.loads(meta_data(ci, "emr", "5eb1a5e0-0000-4000-8000-000000000001"))
    assert md == {"instance-id": "5eb1a5e0-0000-4000-8000-000000000001", "local-hostname": "emr-db1",
                  "public-keys": [KEY]}  # fmt: skip
    net = json.loads(network_config(ci, "52:54:00:AA:BB:CC") or "")
    assert net == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": "52:54:00:aa:bb:cc"}, "addresses": ["10.20.0.15/24"], "gateway4": "10.20.0.1",
        "nameservers": {"addresses": ["10.20.0.2"]}}}}  # fmt: skip
    assert user_data(ci) == "#cloud-config\n{}\n"
    assert network_config(CloudInit(), "52:54:00:aa:bb:cc") is None  # DHCP, as the image does
    assert summary(ci) == {"hostname": "emr-db1", "ip": "10.20.0.15/24", "gateway": "10.20.0.1",
                           "dns": ["10.20.0.2"], "ssh_keys": ["ssh-ed25519 it@hospital"], "user_data": False}  # fmt: skip


def test_a_clone_keeps_keys_and_user_data_but_not_the_name_or_address() -> None:
    ci = CloudInit(hostname="tmpl", ssh_keys=[KEY], ip="10.20.0.15/24", user_data="#cloud-config\n")
    assert ci.for_clone() == CloudInit(ssh_keys=[KEY], user_data="#cloud-config\n")


def test_the_seed_disk_is_an_iso_labelled_cidata(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    ci = CloudInit(ssh_keys=[KEY], ip="10.0.2.50/24", gateway="10.0.2.2", user_data="#cloud-config\nruncmd: []\n")
    seed.make_seed(path, ci, "emr", "uuid-1", [NicSpec(id="net0", mac="52:54:00:00:00:01")])
    label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(path)], capture_output=True, text=True,
                           timeout=10).stdout.strip()  # fmt: skip
    assert label == "cidata"
    listing = subprocess.run(["xorriso", "-indev", str(path), "-ls", "/"], capture_output=True, text=True,
                             timeout=30).stdout  # fmt: skip
    assert "'meta-data'" in listing and "'user-data'" in listing and "'network-config'" in listing, listing
    args = seed.qemu_args(path)
    assert any(a.startswith("driver=file") and "read-only=on" in a for a in args)
    assert "virtio-blk-pci,drive=cidata,id=cidata-dev" in args
