"""HostNetwork against the real kernel, in throwaway network namespaces (root; no QEMU, no lab).

Two "hosts" (namespaces) whose uplinks meet on a plain bridge in a third ("the switch"): VLAN
networks made by HostNetwork carry frames between same-VLAN ports and never across VLANs.
Guests are veth ends in namespaces of their own (QEMU's taps are checked in test_networks.py).
On a kernel without 802.1Q, HostNetwork tags in software; the test passes either way and says
which it used. Every namespace is deleted at the end (their interfaces go with them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from kasou.errors import Conflict
from kasou.hypervisor.qemu.network import HostNetwork, tap_name, vlan_port_name
from kasou.model.spec import NicSpec

pytestmark = pytest.mark.timeout(120)

TAG = f"kn{os.getpid() % 100000}"


def _idx(ipr: Any, name: str) -> int:
    return int(ipr.link_lookup(ifname=name)[0])


def links(ns: str) -> dict[str, dict[str, Any]]:
    """name -> {kind, master (a name), alias, up} of every link in the namespace."""
    with IPRoute(netns=ns, flags=0) as ipr:
        raw = list(ipr.link("dump"))
    by_index = {int(x["index"]): str(x.get_attr("IFLA_IFNAME")) for x in raw}
    out = {}
    for x in raw:
        info = x.get_attr("IFLA_LINKINFO")
        out[str(x.get_attr("IFLA_IFNAME"))] = {
            "kind": info.get_attr("IFLA_INFO_KIND") if info is not None else None,
            "master": by_index.get(x.get_attr("IFLA_MASTER") or 0),
            "alias": x.get_attr("IFLA_IFALIAS"),
            "up": bool(x["flags"] & 1),
        }
    return out


@pytest.fixture
def spaces() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    names = {k: f"{TAG}-{k}" for k in ("sw", "h1", "h2", "g1", "g2", "g3")}
    try:
        for ns in names.values():
            netns.create(ns)
        with IPRoute(netns=names["sw"], flags=0) as sw:
            sw.link("add", ifname="sw0", kind="bridge")
            sw.link("set", index=_idx(sw, "sw0"), state="up")
            for h in ("h1", "h2"):
                sw.link("add", ifname=f"p-{h}", kind="veth", peer={"ifname": "vmnet0", "net_ns_fd": names[h]})
                sw.link("set", index=_idx(sw, f"p-{h}"), master=_idx(sw, "sw0"))
                sw.link("set", index=_idx(sw, f"p-{h}"), state="up")
        yield names
    finally:
        for ns in names.values():
            if ns in netns.listnetns():
                netns.remove(ns)
    assert not [n for n in netns.listnetns() if n.startswith(TAG)]


def guest(spaces: dict[str, str], host: str, g: str, bridge: str, address: str) -> None:
    """A stand-in guest: a veth from the host's network bridge into namespace ``g`` with ``address``."""
    with IPRoute(netns=spaces[host], flags=0) as ipr:
        ipr.link("add", ifname=f"v-{g}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": spaces[g]})
        ipr.link("set", index=_idx(ipr, f"v-{g}"), master=_idx(ipr, bridge))
        ipr.link("set", index=_idx(ipr, f"v-{g}"), state="up")
    with IPRoute(netns=spaces[g], flags=0) as ipr:
        ipr.addr("add", index=_idx(ipr, "eth0"), address=address, prefixlen=24)
        ipr.link("set", index=_idx(ipr, "eth0"), state="up")
        ipr.link("set", index=_idx(ipr, "lo"), state="up")


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(); s.settimeout(float(sys.argv[1]))
print("listening", flush=True)
try:
    while True:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
except OSError:
    pass
"""

CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 7777), timeout=float(sys.argv[2]))
    print("open", c.recv(5).decode())
except OSError as e:
    print("closed", e)
"""


def in_ns(ns: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-S", "-c", code, *args]


def connects(spaces: dict[str, str], g: str, address: str, timeout: float = 3.0) -> bool:
    r = subprocess.run(in_ns(spaces[g], CLIENT, address, str(timeout)), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.startswith("open hello")


def test_vlans_connect_their_own_ports_only(spaces: dict[str, str]) -> None:
    h1 = HostNetwork("vmnet0", netns=spaces["h1"])
    h2 = HostNetwork("vmnet0", netns=spaces["h2"])
    assert h1.ensure_network("clinical", 10) == "kb-clinical"
    h2.ensure_network("clinical", 10)
    h2.ensure_network("imaging", 20)
    guest(spaces, "h1", "g1", "kb-clinical", "192.168.10.1")
    guest(spaces, "h2", "g2", "kb-clinical", "192.168.10.2")
    guest(spaces, "h2", "g3", "kb-imaging", "192.168.10.3")  # same subnet, other VLAN
    servers = [
        subprocess.Popen(in_ns(spaces[g], SERVER, "60"), stdout=subprocess.PIPE, text=True) for g in ("g2", "g3")
    ]
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == "listening"
        assert connects(spaces, "g1", "192.168.10.2"), f"same VLAN across hosts ({h1.tagging} tagging)"
        assert not connects(spaces, "g1", "192.168.10.3", timeout=2.0), "another VLAN must not be reachable"
    finally:
        for s in servers:
            s.kill()
            s.wait(timeout=10)
    seen = links(spaces["h2"])
    if h2.tagging == "8021q":
        assert seen[vlan_port_name("vmnet0", 10)]["master"] == "kb-clinical"
        assert seen[vlan_port_name("vmnet0", 20)]["master"] == "kb-imaging"
    else:
        assert seen["vmnet0"]["master"] == "kvtrunk"
        assert (seen["kv-10"]["master"], seen["kv-10t"]["master"]) == ("kb-clinical", "kvtrunk")
        assert (seen["kv-20"]["master"], seen["kv-20t"]["master"]) == ("kb-imaging", "kvtrunk")
    print(f"VLAN tagging on this kernel: {h2.tagging}")


def test_taps_are_made_on_their_bridge_and_removed(spaces: dict[str, str]) -> None:
    host = HostNetwork("vmnet0", netns=spaces["h1"])
    nics = [
        NicSpec(id="net0", mac="52:54:00:00:00:01", network="clinical", vlan=10),
        NicSpec(id="net1", mac="52:54:00:00:00:02", network="mgmt"),
        NicSpec(id="net2", mac="52:54:00:00:00:03"),  # user: no tap
    ]
    taps = host.plug("a", nics)
    assert taps == [tap_name("a", "net0"), tap_name("a", "net1")]
    seen = links(spaces["h1"])
    for tap, bridge in zip(taps, ("kb-clinical", "kb-mgmt"), strict=True):
        assert seen[tap]["kind"] == "tun" and seen[tap]["master"] == bridge and seen[tap]["up"]
        assert seen[tap]["alias"].startswith("kasou vm a net")
    assert seen["kb-mgmt"]["alias"] == "kasou network mgmt"
    with pytest.raises(Conflict) as e:  # a second untagged network cannot have the uplink
        host.plug("b", [NicSpec(id="net0", mac="52:54:00:00:00:04", network="backup")])
    assert "only one network without a VLAN" in e.value.message
    after = links(spaces["h1"])
    assert tap_name("b", "net0") not in after and "kb-backup" not in after
    assert sorted(host.unplug("a", ["net0", "net1"])) == sorted(taps)
    left = links(spaces["h1"])
    assert not [n for n in left if n.startswith("kt-")]
    assert "kb-clinical" in left and "kb-mgmt" in left  # bridges stay
