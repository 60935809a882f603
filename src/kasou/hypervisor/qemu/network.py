"""VM networks on one host: a bridge per network, its uplink port, a tap per NIC (pyroute2 netlink).

A NIC on network N (anything but ``user``, QEMU's NAT) is a tap device that QEMU opens with
``-netdev tap,ifname=TAP,script=no,downscript=no``. Before QEMU starts, :meth:`HostNetwork.plug`
makes sure that

* the bridge of N exists and is up (made on demand; bridges stay when VMs go);
* with an uplink (``KASOU_UPLINK``, e.g. ``eth1``; optional) the bridge has its uplink port:
  for a network on VLAN V the 802.1Q sub-interface ``<uplink>.<V>`` (made on demand), for the
  one network without a VLAN the uplink itself (a second untagged network is refused: both
  would be the same wire). Without an uplink the bridge joins the VMs of this host only;
* the tap exists, belongs to the bridge and is up.

:meth:`HostNetwork.unplug` deletes a VM's taps when its QEMU has ended (stopped, powered off,
crashed, migrated away, incoming migration aborted) or is forgotten.

Interface names have at most 15 characters (``IFNAMSIZ`` - 1), so names are derived, and
hashed where a name could be longer (SHA-1, hex):

==========================  ============================================  ==========================
what                        name                                          example
==========================  ============================================  ==========================
bridge of network N         ``kb-N`` if N has at most 11 characters,      ``kb-clinical``,
                            else ``kb-`` + N[:4] + ``-`` + 7 hex of N     ``kb-radi-3f2a9c1``
tap of NIC I of VM V        ``kt-`` + 12 hex of ``V/I``                   ``kt-9b1c0d2e4f60``
VLAN port (802.1Q)          ``<uplink>.<V>``, the uplink's name cut so    ``eth1.10``,
                            that the whole fits                           ``enp129s0f1.4094``
==========================  ============================================  ==========================

The two forms of a bridge name differ in length (at most 14 characters, or exactly 15), so a
short name never collides with a hashed one. Every interface kasou makes carries an alias
(``ip link`` shows it): ``kasou network N`` on bridges, ``kasou vm V I`` on taps. A tap or
bridge whose alias names something else is never reused or deleted (a hash collision, or an
interface that is not kasou's, is an error that says so).

Kernels without 802.1Q (``CONFIG_VLAN_8021Q`` unset, as on some minimal cloud kernels) cannot
make ``<uplink>.<V>``. The first time a network needs the uplink, the host tries to make a
VLAN interface; if the kernel does not know the kind, it tags in software instead
(:mod:`kasou.hypervisor.qemu.vlan_bpf`): the uplink joins a trunk bridge ``kvtrunk``, and each
network's bridge reaches it through a veth pair ``kv-<V>`` (network side) / ``kv-<V>t`` (trunk
side; ``kv-u``/``kv-ut`` for the untagged network) whose trunk end tags and untags with eBPF.
The frames on the wire are the same 802.1Q frames.

Every method is synchronous (netlink answers in milliseconds) and serialised by a lock; the
driver calls them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kasou.errors import Conflict, HypervisorError, InvalidSpec
from kasou.model.spec import USER_NETWORK, NicSpec

log = logging.getLogger(__name__)

IFNAME_MAX = 15  # IFNAMSIZ (16) less the terminating NUL
UPLINK_ENV = "KASOU_UPLINK"
TRUNK_BRIDGE = "kvtrunk"  # software tagging only: the bridge the uplink and every network's veth join
_PROBE = "kvprobe0"  # a VLAN interface made and deleted at once, to learn whether the kernel has 802.1Q
_PROBE_VLAN = 4094

Tagging = Literal["8021q", "bpf"]

_ONE_UNTAGGED = "only one network without a VLAN can use the uplink"
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")


def _digest(text: str, length: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def bridge_name(network: str) -> str:
    """``kb-<network>`` for short names, ``kb-<first 4>-<7 hex>`` for longer ones (always <= 15)."""
    if len(network) <= IFNAME_MAX - 4:
        return f"kb-{network}"
    return f"kb-{network[:4]}-{_digest(network, 7)}"


def tap_name(vm: str, nic_id: str) -> str:
    """``kt-<12 hex of vm/nic>``: unique per NIC of a VM, the same on every host it runs on."""
    return f"kt-{_digest(f'{vm}/{nic_id}', 12)}"


def vlan_port_name(uplink: str, vlan: int) -> str:
    """``<uplink>.<vlan>``, the uplink's name shortened so that the whole has at most 15 characters."""
    suffix = f".{vlan}"
    return uplink[: IFNAME_MAX - len(suffix)] + suffix


def soft_port_names(vlan: int | None) -> tuple[str, str]:
    """Software tagging: (network side, trunk side) of the veth pair that carries one VLAN."""
    tag = "u" if vlan is None else str(vlan)
    return f"kv-{tag}", f"kv-{tag}t"


def bridge_alias(network: str) -> str:
    return f"kasou network {network}"


def tap_alias(vm: str, nic_id: str) -> str:
    return f"kasou vm {vm} {nic_id}"


def validate_ifname(name: str, what: str = UPLINK_ENV) -> str:
    """An existing interface's name as the kernel allows it (here: a conservative subset)."""
    if not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidSpec(f"{what} {name!r} is not an interface name (at most 15 letters, digits, '.', '-', '_')")
    return name


def tap_nics(nics: Iterable[NicSpec]) -> list[NicSpec]:
    """The NICs that need a tap (every one not on ``user``)."""
    return [n for n in nics if n.network != USER_NETWORK]


def _one_per_vlan(vlan: int) -> str:
    return f"VLAN {vlan} carries one network"


def _why(e: Exception) -> str:
    return os.strerror(e.code) if isinstance(e, NetlinkError) else str(e)


class HostNetwork:
    """The network plumbing of this host (or of network namespace ``netns``, for tests)."""

    def __init__(self, uplink: str | None = None, netns: str | None = None, tagging: Tagging | None = None) -> None:
        self.uplink = validate_ifname(uplink) if uplink else None
        self.netns = netns
        self._tagging: Tagging | None = tagging  # None: ask the kernel when the uplink is first needed
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[Any]:
        ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    @property
    def tagging(self) -> Tagging | None:
        """How VLANs are tagged here, once known: ``8021q`` (sub-interfaces) or ``bpf`` (software)."""
        return self._tagging

    # -- the public steps ---------------------------------------------------------------

    def plug(self, vm: str, nics: Sequence[NicSpec], owner: tuple[int, int] | None = None) -> list[str]:
        """Make the taps of ``vm``'s NICs (with their networks' bridges and uplink ports); their names.

        ``owner`` (uid, gid): the unprivileged user the VM's QEMU runs as may attach to the taps.

        On failure the taps made so far are deleted again (bridges and ports stay) and the
        error says what was refused, on one line.
        """
        made: list[str] = []
        with self._lock, self._ipr() as ipr:
            try:
                for nic in tap_nics(nics):
                    bridge = self._ensure_network(ipr, nic.network, nic.vlan, nic.isolated)
                    made.append(self._make_tap(ipr, vm, nic.id, bridge, owner))
            except BaseException:
                for name in made:
                    with contextlib.suppress(Exception):
                        _delete(ipr, name)
                raise
        return made

    def unplug(self, vm: str, nic_ids: Iterable[str] = ()) -> list[str]:
        """Delete the taps of ``vm`` (those named after ``nic_ids`` and any whose alias names the VM)."""
        expected = {tap_name(vm, i): tap_alias(vm, i) for i in nic_ids}
        removed = []
        with self._lock, self._ipr() as ipr:
            for link in ipr.link("dump"):
                name = str(link.get_attr("IFLA_IFNAME"))
                alias = link.get_attr("IFLA_IFALIAS")
                words = str(alias or "").split()
                ours = len(words) == 4 and words[:3] == ["kasou", "vm", vm]
                if ours or (name in expected and alias in (None, "", expected[name])):
                    try:
                        _delete(ipr, name)
                    except NetlinkError as e:
                        raise HypervisorError(f"cannot delete tap {name} of VM {vm!r}: {_why(e)}") from None
                    removed.append(name)
        return removed

    def unplug_one(self, vm: str, nic_id: str) -> bool:
        """Delete the tap of NIC ``nic_id`` of ``vm`` only (a NIC unplugged while the VM runs on)."""
        name, alias = tap_name(vm, nic_id), tap_alias(vm, nic_id)
        with self._lock, self._ipr() as ipr:
            link = _link(ipr, name)
            if link is None or link.get_attr("IFLA_IFALIAS") not in (None, "", alias):
                return False
            try:
                _delete(ipr, name)
            except NetlinkError as e:
                raise HypervisorError(f"cannot delete tap {name} of VM {vm!r}: {_why(e)}") from None
        return True

    def ensure_network(self, network: str, vlan: int | None) -> str:
        """The bridge of ``network``, with its uplink port: made if missing; its name."""
        with self._lock, self._ipr() as ipr:
            bridge = self._ensure_network(ipr, network, vlan)
        return bridge

    # -- bridges and uplink ports ---------------------------------------------------------

    def _ensure_network(self, ipr: Any, network: str, vlan: int | None, isolated: bool = False) -> str:
        bridge = bridge_name(network)
        fresh = _index(ipr, bridge) is None
        br = _ensure_bridge(ipr, bridge, bridge_alias(network), f"network {network!r}")
        if self.uplink is None or isolated:  # an isolated network's bridge never gets an uplink port
            return bridge
        try:
            up = _index(ipr, self.uplink)
            if up is None:
                raise HypervisorError(f"the uplink {self.uplink} ({UPLINK_ENV}) does not exist on this host")
            try:
                if self._probe_tagging(ipr, up) == "8021q":
                    self._ensure_vlan_port(ipr, up, br, network, vlan)
                else:
                    self._ensure_soft_port(ipr, up, br, network, vlan)
                ipr.link("set", index=up, state="up")
            except NetlinkError as e:
                where = f"VLAN {vlan}" if vlan is not None else "untagged"
                raise HypervisorError(
                    f"cannot connect network {network!r} ({where}) to the uplink {self.uplink}: {_why(e)}"
                ) from None
        except BaseException:
            if fresh:  # a refused network leaves no empty bridge behind
                with contextlib.suppress(Exception):
                    _delete(ipr, bridge)
            raise
        return bridge

    def _probe_tagging(self, ipr: Any, uplink: int) -> Tagging:
        if self._tagging is not None:
            return self._tagging
        try:
            ipr.link("add", ifname=_PROBE, kind="vlan", link=uplink, vlan_id=_PROBE_VLAN)
        except NetlinkError as e:
            if e.code != errno.EEXIST:  # EEXIST: that VLAN is on the uplink already, so 802.1Q works
                if e.code != errno.EOPNOTSUPP:  # the kernel's answer to a link kind it does not know
                    raise
                self._tagging = "bpf"
                log.warning("this kernel has no 802.1Q VLAN interfaces; VLANs are tagged by eBPF on veth ports")
                return self._tagging
        with contextlib.suppress(NetlinkError):
            _delete(ipr, _PROBE)
        self._tagging = "8021q"
        return self._tagging

    def _ensure_vlan_port(self, ipr: Any, uplink: int, br: int, network: str, vlan: int | None) -> None:
        """802.1Q: ``<uplink>.<V>`` (or, untagged, the uplink itself) becomes a port of the network's bridge."""
        assert self.uplink is not None
        if vlan is None:
            _claim_port(ipr, uplink, br, f"the uplink {self.uplink}", f"network {network!r}", _ONE_UNTAGGED)
            return
        name = vlan_port_name(self.uplink, vlan)
        link = _link(ipr, name)
        if link is None:
            try:
                ipr.link("add", ifname=name, kind="vlan", link=uplink, vlan_id=vlan)
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    raise Conflict(
                        f"VLAN {vlan} is already on the uplink {self.uplink} under another name; "
                        f"kasou wants it as {name}"
                    ) from None
                raise
            link = _link(ipr, name)
            assert link is not None
        elif _kind(link) != "vlan":
            raise Conflict(f"{name} exists on this host but is not a VLAN interface; kasou needs that name")
        _claim_port(ipr, link["index"], br, f"{name} (VLAN {vlan})", f"network {network!r}", _one_per_vlan(vlan))

    def _ensure_soft_port(self, ipr: Any, uplink: int, br: int, network: str, vlan: int | None) -> None:
        """Software tagging: the network's bridge reaches the trunk bridge through a filtered veth pair."""
        from kasou.hypervisor.qemu import vlan_bpf

        trunk = _ensure_bridge(ipr, TRUNK_BRIDGE, f"kasou trunk {self.uplink}", "the VLAN trunk")
        _claim_port(ipr, uplink, trunk, f"the uplink {self.uplink}", "the VLAN trunk", "the trunk needs all of it")
        side, trunk_side = soft_port_names(vlan)
        link, peer = _link(ipr, side), _link(ipr, trunk_side)
        if link is not None and (peer is None or peer.get_attr("IFLA_MASTER") != trunk):
            _delete(ipr, side)  # half made (its filters may be missing): make it again
            link = None
        if link is None:
            if peer is not None:
                _delete(ipr, trunk_side)
            ipr.link("add", ifname=side, kind="veth", peer=trunk_side)
            t = _index(ipr, trunk_side)
            assert t is not None
            if vlan is None:
                ingress = egress = vlan_bpf.untagged_program()
            else:
                ingress, egress = vlan_bpf.push_program(vlan), vlan_bpf.pop_program(vlan)
            ipr.tc("add", "clsact", t)
            tag = "u" if vlan is None else str(vlan)
            # clsact's two hooks: ffff:fff2 sees frames arriving (from the network), ffff:fff3 frames leaving
            hooks = (("ffff:fff2", ingress, f"kasou_in{tag}"), ("ffff:fff3", egress, f"kasou_eg{tag}"))
            for parent, prog, name in hooks:
                fd = vlan_bpf.load(prog, name)
                try:
                    ipr.tc("add-filter", "bpf", t, ":1", fd=fd, name=name, parent=parent, classid=1, direct_action=True)
                finally:
                    os.close(fd)
            # Only now, with both filters in place, does the pair touch the trunk.
            ipr.link("set", index=t, master=trunk)
            ipr.link("set", index=t, state="up")
            link = _link(ipr, side)
            assert link is not None
        if vlan is None:
            _claim_port(ipr, link["index"], br, "the uplink's untagged port", f"network {network!r}", _ONE_UNTAGGED)
        else:
            _claim_port(ipr, link["index"], br, f"VLAN {vlan}", f"network {network!r}", _one_per_vlan(vlan))

    # -- taps ----------------------------------------------------------------------------

    def _make_tap(self, ipr: Any, vm: str, nic_id: str, bridge: str, owner: tuple[int, int] | None = None) -> str:
        name, alias = tap_name(vm, nic_id), tap_alias(vm, nic_id)
        old = _link(ipr, name)
        if old is not None:
            have = old.get_attr("IFLA_IFALIAS")
            if have and have != alias:
                raise Conflict(f"tap {name} for NIC {nic_id} of VM {vm!r} exists and is not kasou's ({have!r})")
            _delete(ipr, name)  # left by a QEMU that ended while the agent was away
        try:
            ids = {} if owner is None else {"uid": owner[0], "gid": owner[1]}
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", **ids)
            idx = _index(ipr, name)
            if idx is None:
                raise HypervisorError(f"tap {name} vanished right after it was made")
            ipr.link("set", index=idx, ifalias=alias)
            br = _index(ipr, bridge)
            assert br is not None
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
        except (NetlinkError, OSError) as e:
            with contextlib.suppress(Exception):
                _delete(ipr, name)
            raise HypervisorError(f"cannot make tap {name} for NIC {nic_id} of VM {vm!r}: {_why(e)}") from None
        return name


# -- netlink helpers ---------------------------------------------------------------------------


def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _link(ipr: Any, name: str) -> Any | None:
    idx = _index(ipr, name)
    if idx is None:
        return None
    try:
        return ipr.link("get", index=idx)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _name_of(ipr: Any, index: int) -> str:
    try:
        link = ipr.link("get", index=index)[0]
    except NetlinkError:
        return f"interface {index}"
    return str(link.get_attr("IFLA_IFNAME"))


def _delete(ipr: Any, name: str) -> None:
    idx = _index(ipr, name)
    if idx is None:
        return
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise


def _ensure_bridge(ipr: Any, name: str, alias: str, what: str) -> int:
    link = _link(ipr, name)
    if link is None:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise HypervisorError(f"cannot make bridge {name} for {what}: {_why(e)}") from None
        link = _link(ipr, name)
        if link is None:
            raise HypervisorError(f"bridge {name} for {what} vanished right after it was made")
    else:
        have = link.get_attr("IFLA_IFALIAS")
        if _kind(link) != "bridge" or (have and have != alias):
            raise Conflict(f"{name} exists on this host but is not the bridge of {what} ({have or _kind(link)})")
    idx = int(link["index"])
    try:
        if link.get_attr("IFLA_IFALIAS") != alias:
            ipr.link("set", index=idx, ifalias=alias)
        ipr.link("set", index=idx, state="up")
    except NetlinkError as e:
        raise HypervisorError(f"cannot set up bridge {name} for {what}: {_why(e)}") from None
    return idx


def _claim_port(ipr: Any, port: int, bridge: int, what: str, wanted: str, rule: str) -> None:
    """Make ``port`` a port of ``bridge`` (up), unless another bridge has it: that is refused, saying whose it is."""
    link = ipr.link("get", index=port)[0]
    master = link.get_attr("IFLA_MASTER")
    if master and master != bridge:
        other = ipr.link("get", index=master)[0]
        alias = str(other.get_attr("IFLA_IFALIAS") or "")
        if alias.startswith("kasou network "):
            owner = f"network {alias.split(' ', 2)[2]!r}"
        else:
            owner = f"bridge {other.get_attr('IFLA_IFNAME')}"
        raise Conflict(f"{what} already belongs to {owner}; it cannot carry {wanted} too ({rule})")
    if master != bridge:
        ipr.link("set", index=port, master=bridge)
    ipr.link("set", index=port, state="up")
