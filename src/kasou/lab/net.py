"""Netlink plumbing of the lab, over pyroute2: network namespaces, a bridge, veth pairs.

Every function is idempotent (creating what exists or deleting what is gone is not an
error), so ``kasou lab up`` can repair a half-made lab and ``kasou lab down`` can clean one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from kasou.errors import KasouError

NETNS_DIR = Path("/var/run/netns")
IFF_UP = 0x1


class LabError(KasouError):
    """A lab operation failed (the message says what and why, on one line)."""


def _fail(what: str, e: Exception) -> LabError:
    detail = os.strerror(e.code) if isinstance(e, NetlinkError) else str(e)
    return LabError(f"{what}: {detail}")


# -- namespaces --------------------------------------------------------------------------------


def netns_names() -> list[str]:
    return list(netns.listnetns())


def netns_exists(name: str) -> bool:
    return name in netns.listnetns()


def netns_inode(name: str) -> tuple[int, int] | None:
    """(device, inode) of a named namespace: a process is in it if its /proc/PID/ns/net matches."""
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def ensure_netns(name: str) -> bool:
    """Create the namespace ``name`` unless it exists; True if it was created."""
    if netns_exists(name):
        return False
    try:
        netns.create(name)
    except OSError as e:
        raise _fail(f"cannot create network namespace {name}", e) from e
    return True


def remove_netns(name: str) -> bool:
    """Delete the namespace ``name`` (its interfaces go with it); True if there was one."""
    if not netns_exists(name):
        return False
    try:
        netns.remove(name)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise _fail(f"cannot delete network namespace {name}", e) from e
    return True


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is ``name``."""
    ident = netns_inode(name)
    if ident is None:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = os.stat(d / "ns" / "net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            out.append(int(d.name))
    return out


def socket_in(name: str, timeout: float) -> socket.socket:
    """A TCP socket that lives in the namespace ``name`` (to reach a host even when partitioned)."""
    sock = netns.create_socket(name, socket.AF_INET, socket.SOCK_STREAM, flags=0, timeout=max(1, int(timeout)))
    sock.settimeout(timeout)
    return sock


# -- links in the root namespace -----------------------------------------------------------------


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def link_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return _index(ipr, ifname) is not None


def link_names(prefix: str) -> list[str]:
    """Interfaces of the root namespace whose names start with ``prefix``."""
    with IPRoute() as ipr:
        names = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.link("dump")]
    return sorted(n for n in names if n.startswith(prefix))


def link_up(ifname: str) -> bool | None:
    """Whether the interface is administratively up; None if it does not exist."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return None
        return bool(ipr.link("get", index=idx)[0]["flags"] & IFF_UP)


def set_link(ifname: str, up: bool) -> None:
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise LabError(f"there is no interface {ifname}")
        try:
            ipr.link("set", index=idx, state="up" if up else "down")
        except NetlinkError as e:
            raise _fail(f"cannot set {ifname} {'up' if up else 'down'}", e) from e


def delete_link(ifname: str) -> bool:
    """Delete an interface of the root namespace (a veth takes its peer along); True if it existed."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise _fail(f"cannot delete {ifname}", e) from e
    return True


def ensure_bridge(ifname: str, address: str | None = None, prefixlen: int = 24) -> bool:
    """A bridge, up, with ``address/prefixlen`` if one is given. True if the bridge was created."""
    created = False
    with IPRoute() as ipr:
        try:
            idx = _index(ipr, ifname)
            if idx is None:
                ipr.link("add", ifname=ifname, kind="bridge")
                created = True
                idx = _index(ipr, ifname)
                assert idx is not None
            if address is not None:
                have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.addr("dump", index=idx)}
                if (address, prefixlen) not in have:
                    ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as e:
            raise _fail(f"cannot set up bridge {ifname}", e) from e
    return created


def ensure_host_link(
    veth: str, ns: str, bridge: str, address: str, prefixlen: int, gateway: str, inside: str = "eth0"
) -> bool:
    """Connect namespace ``ns`` to ``bridge``: veth ``veth`` (root side, a port of the bridge, up)
    to ``inside`` in the namespace with ``address/prefixlen``, ``lo`` up and a default route via
    ``gateway``. True if the veth pair was created."""
    created = False
    with IPRoute() as ipr:
        try:
            br = _index(ipr, bridge)
            if br is None:
                raise LabError(f"there is no bridge {bridge}")
            idx = _index(ipr, veth)
            if idx is not None and not _has_link_in(ns, inside):
                ipr.link("del", index=idx)  # a stale root side whose peer is elsewhere
                idx = None
            if idx is None:
                # The peer is made directly in the namespace: "eth0" would clash in the root one.
                ipr.link("add", ifname=veth, kind="veth", peer={"ifname": inside, "net_ns_fd": ns})
                created = True
                idx = _index(ipr, veth)
                assert idx is not None
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as e:
            raise _fail(f"cannot set up the link {veth} of {ns}", e) from e
    try:
        with IPRoute(netns=ns, flags=0) as nsr:
            lo = _index(nsr, "lo")
            eth = _index(nsr, inside)
            if lo is None or eth is None:
                raise LabError(f"{inside} or lo is missing in network namespace {ns}")
            nsr.link("set", index=lo, state="up")
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in nsr.addr("dump", index=eth)}
            if (address, prefixlen) not in have:
                nsr.addr("add", index=eth, address=address, prefixlen=prefixlen)
            nsr.link("set", index=eth, state="up")
            routes = nsr.route("dump", family=socket.AF_INET, dst_len=0, table=254)
            if not any(r.get_attr("RTA_GATEWAY") == gateway for r in routes):
                with contextlib.suppress(NetlinkError):
                    nsr.route("del", dst="0.0.0.0/0")
                nsr.route("add", dst="0.0.0.0/0", gateway=gateway)
    except NetlinkError as e:
        raise _fail(f"cannot configure {inside} in network namespace {ns}", e) from e
    return created


def _has_link_in(ns: str, ifname: str) -> bool:
    if not netns_exists(ns):
        return False
    with IPRoute(netns=ns, flags=0) as nsr:
        return _index(nsr, ifname) is not None


def ensure_vm_link(veth: str, ns: str, bridge: str, inside: str = "vmnet0") -> bool:
    """A second, address-less link for VM traffic: veth ``veth`` (root side, a port of ``bridge``,
    up) to ``inside`` in namespace ``ns``, up. The host's agent uses ``inside`` as its uplink and
    tags VLANs on it. True if the veth pair was created."""
    created = False
    with IPRoute() as ipr:
        try:
            br = _index(ipr, bridge)
            if br is None:
                raise LabError(f"there is no bridge {bridge}")
            idx = _index(ipr, veth)
            if idx is not None and not _has_link_in(ns, inside):
                ipr.link("del", index=idx)  # a stale root side whose peer is elsewhere
                idx = None
            if idx is None:
                ipr.link("add", ifname=veth, kind="veth", peer={"ifname": inside, "net_ns_fd": ns})
                created = True
                idx = _index(ipr, veth)
                assert idx is not None
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
        except NetlinkError as e:
            raise _fail(f"cannot set up the VM link {veth} of {ns}", e) from e
    try:
        with IPRoute(netns=ns, flags=0) as nsr:
            idx = _index(nsr, inside)
            if idx is None:
                raise LabError(f"{inside} is missing in network namespace {ns}")
            nsr.link("set", index=idx, state="up")
    except NetlinkError as e:
        raise _fail(f"cannot set {inside} up in network namespace {ns}", e) from e
    return created


def remove_each(steps: Iterable[tuple[str, Callable[[], bool]]], removed: list[str], errors: list[str]) -> None:
    """Run each teardown step (a link's or a namespace's removal): what it removed goes to ``removed``, why one
    failed to ``errors``; a failed step does not stop the others."""
    for what, step in steps:
        try:
            if step():
                removed.append(what)
        except (OSError, KasouError) as e:
            errors.append(f"{what}: {e}")


# A lab host's services run in its network namespace and a mount namespace of their own, with a /sys of that
# network namespace (its links' counters, as ``ip netns exec`` gives) but the machine's cgroup file system kept in
# it (``ip netns exec`` loses it): the hosts' QEMUs are confined in cgroups as on a real host, so that 33 guests
# booting at once do not starve the agents, the APIs and the control plane's leader of CPU (they did: its lease
# expired, and a bulk start was cut short by the new leader).
_KEEP_CGROUPS = (
    '{ mount --rbind /sys/fs/cgroup "$0" && kept=1; } 2>/dev/null; mount -t sysfs sysfs /sys || exit 111; '
    '[ -z "$kept" ] || mount --move "$0" /sys/fs/cgroup || exit 112; exec "$@"'
)


def in_netns(netns: str, scratch: Path) -> list[str]:
    """The command prefix that runs a service in ``netns`` (``scratch``: an empty directory of the lab's)."""
    for tool in ("nsenter", "unshare"):
        if shutil.which(tool) is None:
            raise LabError(f"the {tool} command is missing (apt-get install util-linux)")
    scratch.mkdir(exist_ok=True)
    return ["nsenter", f"--net=/run/netns/{netns}", "--", "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", _KEEP_CGROUPS, str(scratch)]  # fmt: skip
