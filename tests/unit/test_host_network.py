"""HostNetwork's plumbing rules against an in-memory netlink (no root, no kernel).

The fake keeps links with their kind, master, alias and state, refuses what the kernel
refuses (a name twice, one VLAN twice on a device, a VLAN on a kernel without 802.1Q) and
logs every change, so the tests see both the end state and the order of the steps.
The same class runs against the real kernel in tests/integration/test_host_network.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from kasou.errors import Conflict, HypervisorError
from kasou.hypervisor.qemu import network as netmod
from kasou.hypervisor.qemu import vlan_bpf
from kasou.hypervisor.qemu.network import HostNetwork, tap_name
from kasou.model.spec import NicSpec


@dataclass
class Link:
    index: int
    name: str
    kind: str | None
    master: int | None = None
    alias: str | None = None
    up: bool = False
    lower: int | None = None
    vlan: int | None = None
    peer: str | None = None


class _Info:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def get_attr(self, name: str) -> Any:
        return self.kind if name == "IFLA_INFO_KIND" else None


class _Msg:
    def __init__(self, link: Link) -> None:
        self.link = link

    def __getitem__(self, key: str) -> Any:
        assert key == "index"
        return self.link.index

    def get_attr(self, name: str) -> Any:
        link = self.link
        return {
            "IFLA_IFNAME": link.name,
            "IFLA_MASTER": link.master,
            "IFLA_IFALIAS": link.alias,
            "IFLA_LINKINFO": _Info(link.kind) if link.kind else None,
        }[name]


class FakeNetlink:
    def __init__(self, vlan_support: bool = True, links: tuple[str, ...] = ("lo", "eth0", "eth1")) -> None:
        self.vlan_support = vlan_support
        self.links: dict[int, Link] = {}
        self.log: list[tuple[Any, ...]] = []
        self.fail_tap: str | None = None  # a tap name whose creation fails
        for name in links:
            self._add(name, "veth" if name.startswith("eth") else None)

    def _add(self, name: str, kind: str | None, **kw: Any) -> Link:
        link = Link(max(self.links, default=0) + 1, name, kind, **kw)
        self.links[link.index] = link
        return link

    def by_name(self, name: str) -> Link | None:
        return next((x for x in self.links.values() if x.name == name), None)

    def name_of(self, index: int | None) -> str | None:
        return None if index is None else self.links[index].name

    def link_lookup(self, ifname: str) -> list[int]:
        link = self.by_name(ifname)
        return [link.index] if link else []

    def link(self, cmd: str, **kw: Any) -> Any:
        if cmd == "dump":
            return [_Msg(x) for x in self.links.values()]
        if cmd == "get":
            if kw["index"] not in self.links:
                raise NetlinkError(errno.ENODEV)
            return [_Msg(self.links[kw["index"]])]
        self.log.append((cmd, kw.get("ifname") or self.name_of(kw.get("index")), kw))
        if cmd == "add":
            name, kind = kw["ifname"], kw["kind"]
            if self.by_name(name):
                raise NetlinkError(errno.EEXIST)
            if kind == "vlan":
                if not self.vlan_support:
                    raise NetlinkError(errno.EOPNOTSUPP)
                if any(x.lower == kw["link"] and x.vlan == kw["vlan_id"] for x in self.links.values()):
                    raise NetlinkError(errno.EEXIST)
                self._add(name, "vlan", lower=kw["link"], vlan=kw["vlan_id"])
            elif kind == "veth":
                self._add(name, "veth", peer=kw["peer"])
                self._add(kw["peer"], "veth", peer=name)
            elif kind == "tuntap":
                if name == self.fail_tap:
                    raise NetlinkError(errno.EBUSY)
                self._add(name, "tun")
            else:
                self._add(name, kind)
        elif cmd == "set":
            link = self.links[kw["index"]]
            if "master" in kw:
                link.master = kw["master"]
            if "state" in kw:
                link.up = kw["state"] == "up"
            if "ifalias" in kw:
                link.alias = kw["ifalias"]
        elif cmd == "del":
            link = self.links.pop(kw["index"])
            for other in list(self.links.values()):
                if other.master == link.index:
                    other.master = None
                if other.name == link.peer or other.lower == link.index:
                    del self.links[other.index]
        return []

    def tc(self, *args: Any, **kw: Any) -> None:
        self.log.append(("tc", self.name_of(args[2]), {"args": args[:2], **kw}))

    def close(self) -> None:
        pass

    # what the tests look at
    def master(self, name: str) -> str | None:
        link = self.by_name(name)
        assert link is not None, f"{name} does not exist"
        return self.name_of(link.master)

    def names(self, prefix: str) -> list[str]:
        return sorted(x.name for x in self.links.values() if x.name.startswith(prefix))


class Host(HostNetwork):
    def __init__(self, fake: FakeNetlink, uplink: str | None = "eth1") -> None:
        super().__init__(uplink)
        self.fake = fake

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[Any]:
        yield self.fake


def nic(network: str, vlan: int | None = None, nic_id: str = "net0") -> NicSpec:
    return NicSpec(id=nic_id, mac="52:54:00:00:00:01", network=network, vlan=vlan)


@pytest.fixture
def fake() -> FakeNetlink:
    return FakeNetlink()


def test_a_vlan_network_gets_a_bridge_a_vlan_port_and_a_tap(fake: FakeNetlink) -> None:
    host = Host(fake)
    taps = host.plug("a", [nic("clinical", 10)])
    tap = tap_name("a", "net0")
    assert taps == [tap]
    assert host.tagging == "8021q"
    assert fake.master("eth1.10") == "kb-clinical"
    assert fake.master(tap) == "kb-clinical"
    bridge = fake.by_name("kb-clinical")
    assert bridge is not None and bridge.kind == "bridge" and bridge.up and bridge.alias == "kasou network clinical"
    vlan_port = fake.by_name("eth1.10")
    assert vlan_port is not None and vlan_port.vlan == 10 and vlan_port.up
    tap_link = fake.by_name(tap)
    assert tap_link is not None and tap_link.up and tap_link.alias == "kasou vm a net0"
    assert fake.by_name("kvprobe0") is None  # the probe of 802.1Q support leaves nothing


def test_the_tap_joins_its_bridge_before_it_is_up(fake: FakeNetlink) -> None:
    Host(fake).plug("a", [nic("clinical", 10)])
    tap = tap_name("a", "net0")
    steps = [(cmd, kw.get("master") is not None, kw.get("state")) for cmd, name, kw in fake.log if name == tap]
    assert steps[0][0] == "add"
    assert steps.index(("set", True, None)) < steps.index(("set", False, "up"))


def test_networks_share_the_uplink_by_vlan(fake: FakeNetlink) -> None:
    host = Host(fake)
    host.plug("a", [nic("clinical", 10)])
    host.plug("b", [nic("clinical", 10)])
    host.plug("c", [nic("imaging", 20)])
    assert fake.master("eth1.10") == "kb-clinical"
    assert fake.master("eth1.20") == "kb-imaging"
    assert fake.master(tap_name("b", "net0")) == "kb-clinical"
    assert fake.master(tap_name("c", "net0")) == "kb-imaging"
    assert fake.master("eth1") is None  # the uplink itself carries only tagged frames here


def test_one_untagged_network_takes_the_uplink_a_second_is_refused(fake: FakeNetlink) -> None:
    host = Host(fake)
    host.plug("m", [nic("mgmt")])
    assert fake.master("eth1") == "kb-mgmt"
    with pytest.raises(Conflict) as e:
        host.plug("n", [nic("backup")])
    assert "network 'mgmt'" in e.value.message and "only one network without a VLAN" in e.value.message
    assert "\n" not in e.value.message
    assert fake.by_name(tap_name("n", "net0")) is None
    assert fake.by_name("kb-backup") is None  # no empty bridge left by the refusal
    assert fake.master("eth1") == "kb-mgmt"


def test_a_vlan_already_carrying_another_network_is_refused(fake: FakeNetlink) -> None:
    host = Host(fake)
    host.plug("a", [nic("clinical", 10)])
    with pytest.raises(Conflict) as e:
        host.plug("x", [nic("other", 10)])
    assert "eth1.10 (VLAN 10) already belongs to network 'clinical'" in e.value.message


def test_without_an_uplink_a_network_stays_on_the_host(fake: FakeNetlink) -> None:
    host = Host(fake, uplink=None)
    host.plug("a", [nic("clinical", 10)])
    assert fake.master(tap_name("a", "net0")) == "kb-clinical"
    assert fake.names("eth1.") == [] and host.tagging is None


def test_an_isolated_network_never_gets_the_uplink(fake: FakeNetlink) -> None:
    host = Host(fake)
    isolated = NicSpec(id="net0", mac="52:54:00:00:00:01", network="drill", isolated=True)
    host.plug("a", [isolated])
    assert fake.master(tap_name("a", "net0")) == "kb-drill"
    assert fake.master("eth1") is None and fake.names("eth1.") == []  # the uplink is not touched
    host.plug("m", [nic("mgmt")])  # the one untagged network still takes the uplink
    assert fake.master("eth1") == "kb-mgmt"


def test_a_missing_uplink_is_a_clear_error(fake: FakeNetlink) -> None:
    with pytest.raises(HypervisorError) as e:
        Host(fake, uplink="eth9").plug("a", [nic("clinical", 10)])
    assert e.value.message == "the uplink eth9 (KASOU_UPLINK) does not exist on this host"
    assert fake.names("kt-") == [] and fake.names("kb-") == []


def test_user_nics_need_nothing(fake: FakeNetlink) -> None:
    assert Host(fake).plug("a", [nic("user")]) == []
    assert fake.log == []


def test_a_failed_plug_leaves_no_tap(fake: FakeNetlink) -> None:
    fake.fail_tap = tap_name("a", "net1")
    with pytest.raises(HypervisorError) as e:
        Host(fake).plug("a", [nic("clinical", 10), nic("imaging", 20, "net1")])
    assert "cannot make tap" in e.value.message
    assert fake.names("kt-") == []
    assert fake.master("eth1.10") == "kb-clinical"  # bridges and their ports stay


def test_unplug_removes_only_that_vms_taps(fake: FakeNetlink) -> None:
    host = Host(fake)
    host.plug("a", [nic("clinical", 10), nic("imaging", 20, "net1")])
    host.plug("b", [nic("clinical", 10)])
    removed = host.unplug("a", ["net0", "net1"])
    assert sorted(removed) == sorted([tap_name("a", "net0"), tap_name("a", "net1")])
    assert fake.names("kt-") == [tap_name("b", "net0")]
    assert fake.by_name("kb-clinical") is not None and fake.by_name("eth1.10") is not None
    assert host.unplug("a", ["net0"]) == []  # idempotent
    assert host.unplug("b") == [tap_name("b", "net0")]  # found by its alias alone


def test_a_stale_tap_of_the_same_nic_is_replaced_a_foreign_one_is_refused(fake: FakeNetlink) -> None:
    host = Host(fake)
    host.plug("a", [nic("clinical", 10)])
    host.plug("a", [nic("clinical", 10)])  # after a QEMU that ended while the agent was away
    assert fake.names("kt-") == [tap_name("a", "net0")]
    fake.by_name(tap_name("a", "net0")).alias = "something else"  # type: ignore[union-attr]
    with pytest.raises(Conflict):
        host.plug("a", [nic("clinical", 10)])


def test_a_foreign_interface_with_a_bridge_name_is_refused(fake: FakeNetlink) -> None:
    fake._add("kb-clinical", "veth")
    with pytest.raises(Conflict) as e:
        Host(fake).plug("a", [nic("clinical", 10)])
    assert "kb-clinical exists on this host but is not the bridge of network 'clinical'" in e.value.message


# -- kernels without 802.1Q: tagging by eBPF on a veth pair ---------------------------------------


@pytest.fixture
def no_8021q(monkeypatch: pytest.MonkeyPatch) -> FakeNetlink:
    monkeypatch.setattr(vlan_bpf, "load", lambda prog, name: os.open(os.devnull, os.O_RDONLY))
    return FakeNetlink(vlan_support=False)


def test_without_8021q_vlans_go_through_a_tagging_veth_to_the_trunk(no_8021q: FakeNetlink) -> None:
    fake = no_8021q
    host = Host(fake)
    host.plug("a", [nic("clinical", 10)])
    host.plug("c", [nic("imaging", 20)])
    assert host.tagging == "bpf"
    assert fake.master("eth1") == netmod.TRUNK_BRIDGE
    assert fake.master("kv-10") == "kb-clinical" and fake.master("kv-10t") == netmod.TRUNK_BRIDGE
    assert fake.master("kv-20") == "kb-imaging" and fake.master("kv-20t") == netmod.TRUNK_BRIDGE
    assert fake.names("eth1.") == [] and fake.by_name("kvprobe0") is None


def test_the_tagging_filters_are_in_place_before_the_veth_touches_the_trunk(no_8021q: FakeNetlink) -> None:
    fake = no_8021q
    Host(fake).plug("a", [nic("clinical", 10)])
    steps = [(cmd, kw) for cmd, name, kw in fake.log if name == "kv-10t"]
    filters = [i for i, (cmd, kw) in enumerate(steps) if cmd == "tc" and kw["args"] == ("add-filter", "bpf")]
    joins = [i for i, (cmd, kw) in enumerate(steps) if cmd == "set" and kw.get("master") is not None]
    assert len(filters) == 2 and len(joins) == 1 and max(filters) < joins[0]
    parents = sorted(kw["parent"] for cmd, kw in steps if cmd == "tc" and "parent" in kw)
    assert parents == ["ffff:fff2", "ffff:fff3"]  # ingress pushes the tag, egress pops it


def test_without_8021q_still_one_untagged_network(no_8021q: FakeNetlink) -> None:
    fake = no_8021q
    host = Host(fake)
    host.plug("m", [nic("mgmt")])
    assert fake.master("kv-u") == "kb-mgmt" and fake.master("kv-ut") == netmod.TRUNK_BRIDGE
    with pytest.raises(Conflict) as e:
        host.plug("n", [nic("backup")])
    assert "network 'mgmt'" in e.value.message
    assert fake.by_name(tap_name("n", "net0")) is None


def test_a_half_made_tagging_veth_is_made_again(no_8021q: FakeNetlink) -> None:
    fake = no_8021q
    fake._add("kv-10", "veth", peer="kv-10t")
    fake._add("kv-10t", "veth", peer="kv-10")  # never joined the trunk: its filters may be missing
    Host(fake).plug("a", [nic("clinical", 10)])
    assert any(cmd == "del" and name == "kv-10" for cmd, name, _ in fake.log)
    assert fake.master("kv-10t") == netmod.TRUNK_BRIDGE
