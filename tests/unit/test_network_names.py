"""Interface names of VM networks (bridges, taps, VLAN ports), the tagging programs, and the network spec."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kasou.errors import InvalidSpec
from kasou.hypervisor.qemu import vlan_bpf
from kasou.hypervisor.qemu.network import (
    IFNAME_MAX,
    bridge_name,
    soft_port_names,
    tap_name,
    tap_nics,
    validate_ifname,
    vlan_port_name,
)
from kasou.model.spec import NAME_MAX, NetworkCreate, NicSpec, VMCreate

SAFE = string.ascii_letters + string.digits + "-_."
NAMES = st.text(alphabet=SAFE, min_size=1, max_size=NAME_MAX).filter(lambda n: n[0].isalnum() and ".." not in n)


def test_short_network_names_are_readable() -> None:
    assert bridge_name("clinical") == "kb-clinical"
    assert bridge_name("imaging") == "kb-imaging"
    assert bridge_name("a" * 11) == "kb-" + "a" * 11  # 14 characters, the longest readable form


def test_long_network_names_are_hashed_to_15_characters() -> None:
    long = bridge_name("radiology-pacs-archive")
    assert len(long) == IFNAME_MAX
    assert long.startswith("kb-radi-")
    assert long == bridge_name("radiology-pacs-archive")  # stable: every host derives the same name
    assert bridge_name("radiology-pacs-archive2") != long


@given(NAMES)
def test_every_bridge_name_fits_and_cannot_collide_across_forms(network: str) -> None:
    name = bridge_name(network)
    assert len(name) <= IFNAME_MAX
    assert name.startswith("kb-")
    # Readable names are at most 14 characters, hashed ones exactly 15: the two forms never meet.
    assert (len(name) == IFNAME_MAX) == (len(network) > IFNAME_MAX - 4)


@given(NAMES, st.sampled_from(["net0", "net1", "net12"]))
def test_tap_names_fit_and_are_stable(vm: str, nic: str) -> None:
    name = tap_name(vm, nic)
    assert len(name) == IFNAME_MAX
    assert name.startswith("kt-") and all(c in "0123456789abcdef" for c in name[3:])
    assert tap_name(vm, nic) == name


def test_tap_names_differ_per_vm_and_nic() -> None:
    names = {tap_name(vm, nic) for vm in ("a", "b", "emr-db1", "emr-db1x") for nic in ("net0", "net1")}
    assert len(names) == 8


def test_vlan_port_names() -> None:
    assert vlan_port_name("eth1", 10) == "eth1.10"
    assert vlan_port_name("vmnet0", 4094) == "vmnet0.4094"
    # A long uplink name is cut so that the VLAN still shows: at most 15 characters.
    assert vlan_port_name("enp129s0f1np1", 4094) == "enp129s0f1.4094"
    assert vlan_port_name("enp129s0f1np1", 7) == "enp129s0f1np1.7"
    for vlan in (1, 10, 999, 4094):
        assert len(vlan_port_name("a" * 15, vlan)) == IFNAME_MAX


def test_software_tagging_port_names() -> None:
    assert soft_port_names(10) == ("kv-10", "kv-10t")
    assert soft_port_names(None) == ("kv-u", "kv-ut")
    assert all(len(n) <= IFNAME_MAX for n in soft_port_names(4094))


@pytest.mark.parametrize("bad", ["", "a" * 16, "eth 1", "eth1/2", "x:y", "..", "eth1;reboot"])
def test_bad_uplink_names(bad: str) -> None:
    with pytest.raises(InvalidSpec):
        validate_ifname(bad)


def test_good_uplink_names() -> None:
    for good in ("eth1", "vmnet0", "enp129s0f1np1", "bond0.100", "br-uplink"):
        assert validate_ifname(good) == good


def test_tap_nics_skip_user() -> None:
    nics = [
        NicSpec(id="net0", mac="52:54:00:00:00:01"),
        NicSpec(id="net1", mac="52:54:00:00:00:02", network="clinical", vlan=10),
    ]
    assert [n.id for n in tap_nics(nics)] == ["net1"]


# -- the eBPF tagging programs (assembled here, loaded only on hosts without 802.1Q) -------------


@pytest.mark.parametrize("vlan", [1, 10, 4094])
def test_tagging_programs_encode_their_vlan(vlan: int) -> None:
    for prog in (vlan_bpf.push_program(vlan), vlan_bpf.pop_program(vlan)):
        assert len(prog) % 8 == 0
        immediates = [int.from_bytes(prog[i + 4 : i + 8], "little", signed=True) for i in range(0, len(prog), 8)]
        assert vlan in immediates
        assert prog[-8] == 0x95  # ends in exit
    assert vlan_bpf.push_program(vlan) != vlan_bpf.push_program(vlan % 4094 + 1)


def test_untagged_program_is_small_and_ends_in_exit() -> None:
    prog = vlan_bpf.untagged_program()
    assert len(prog) == 5 * 8 and prog[-8] == 0x95


# -- the network spec ---------------------------------------------------------------------------


def test_network_create_accepts_a_vlan_or_none() -> None:
    n = NetworkCreate.parse({"name": "clinical", "vlan": 10, "description": "wards and EMR"})
    assert (n.name, n.vlan, n.description) == ("clinical", 10, "wards and EMR")
    assert NetworkCreate.parse({"name": "mgmt"}).vlan is None
    assert NetworkCreate.parse({"name": "x", "vlan": 4094}).vlan == 4094


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "x", "vlan": 0}, "between 1 and 4094, not 0"),
        ({"name": "x", "vlan": 5000}, "between 1 and 4094, not 5000"),
        ({"name": "x", "vlan": 4095}, "not 4095"),
        ({"name": "x", "vlan": -1}, "not -1"),
        ({"name": "x", "vlan": "10"}, "vlan"),
        ({"name": "x", "vlan": True}, "vlan"),
        ({"name": "x", "vlan": 1.5}, "vlan"),
        ({"name": "a/b"}, "may contain only"),
        ({"name": "../etc"}, "'..'"),
        ({"name": ""}, "must not be empty"),
        ({"name": "user"}, "built-in NAT"),
        ({"name": "x", "mtu": 9000}, "mtu"),
        ({"vlan": 10}, "name"),
    ],
)
def test_network_create_refuses_bad_input_in_one_line(body: dict, words: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        NetworkCreate.parse(body)
    assert words in e.value.message
    assert "\n" not in e.value.message


def test_vm_create_takes_a_network_name() -> None:
    assert VMCreate.parse({"name": "a", "image": "tiny"}).network == "user"
    assert VMCreate.parse({"name": "a", "image": "tiny", "network": "clinical"}).network == "clinical"
    with pytest.raises(InvalidSpec):
        VMCreate.parse({"name": "a", "image": "tiny", "network": "a/b"})


def test_nic_spec_keeps_network_and_vlan() -> None:
    nic = NicSpec(id="net0", mac="52:54:00:AA:BB:CC", network="imaging", vlan=20)
    again = NicSpec.model_validate(nic.model_dump())
    assert again == nic and again.mac == "52:54:00:aa:bb:cc"
    assert NicSpec(id="net0", mac="52:54:00:00:00:01").vlan is None  # records from before networks
