"""Named VM networks (hospital segments such as clinical, imaging, mgmt), kept under ``networks/<name>``.

A network is a name, an optional 802.1Q VLAN, a description and, if an administrator set one, the
departments whose VMs may use it (unset: every department). The control plane keeps the records
and their rules: names are unique, a VLAN carries one network, a network cannot be deleted while
a VM has a NIC on it, and a VM of a department the network does not list cannot be put on it (a
VM without a department, which only administrators and operators manage, may use any network).
To a department-scoped user (a vendor) a network their departments may not use does not exist:
it is "unknown", and the list of networks in that error names only the ones they may use.
The built-in ``user`` network (QEMU's NAT) has no record. Hosts make the bridges, VLAN ports
and taps when a VM on the network starts there (:mod:`kasou.hypervisor.qemu.network`); a VM's
NIC records its network and VLAN when it is created, so both travel with it.

A delete and a VM create cannot race into a VM on a deleted network: the delete first marks
the record ``deleting`` (compare-and-swap), then looks for VMs on it; a create first writes its
VM record, then reads the network again and backs out if it is marked or gone. Whichever of the
two comes second sees the other. Two creates of one VLAN are settled the same way: after
writing, each looks again, and the later write (higher revision) withdraws.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection

from pydantic import BaseModel, Field

from kasou.control.records import VMRecord
from kasou.errors import AlreadyExists, Conflict, InvalidSpec, NotFound, StoreConflict, WrongState
from kasou.model.spec import USER_NETWORK, NetworkCreate, NetworkUpdate, validate_name
from kasou.store.base import Entry, Store


def network_key(name: str) -> str:
    return f"networks/{name}"


class NetworkRecord(BaseModel):
    name: str
    vlan: int | None = None
    description: str = ""
    created_at: float = Field(default_factory=time.time)
    deleting: bool = False  # a delete is checking that no VM uses it; VM creates refuse it meanwhile
    departments: list[str] | None = None  # the departments whose VMs may use it; None: every department
    isolated: bool = False  # never connected to a host's uplink

    def allows(self, department: str | None) -> bool:
        """May a VM of ``department`` have a NIC on it (a VM without one may: administrators manage it)?"""
        return self.departments is None or department is None or department in self.departments

    def visible_to(self, scope: Collection[str] | None) -> bool:
        """Does a user confined to the departments ``scope`` (None: not confined) know of it?"""
        return scope is None or self.departments is None or any(d in self.departments for d in scope)


class NetworkView(BaseModel):
    """A network as the API and the CLI show it."""

    name: str
    vlan: int | None
    description: str
    created_at: float
    departments: list[str] | None = None  # the departments whose VMs may use it (None: every department)
    isolated: bool = False  # never connected to a host's uplink: its VMs reach each other on one host only
    vms: list[str]  # the VMs with a NIC on it (a delete is refused while there are any)


class Networks:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def _entries(self) -> list[tuple[Entry, NetworkRecord]]:
        return [(e, NetworkRecord.model_validate(e.value)) for e in await self.store.range("networks/")]

    async def _users(self) -> dict[str, list[str]]:
        """Network name -> the VMs with a NIC on it."""
        users: dict[str, list[str]] = {}
        for e in await self.store.range("vms/"):
            rec = VMRecord.model_validate(e.value)
            for nic in rec.nics:
                users.setdefault(nic.network, []).append(rec.name)
        return {k: sorted(set(v)) for k, v in users.items()}

    @staticmethod
    def _view(rec: NetworkRecord, users: dict[str, list[str]]) -> NetworkView:
        return NetworkView(
            name=rec.name,
            vlan=rec.vlan,
            description=rec.description,
            created_at=rec.created_at,
            departments=rec.departments,
            isolated=rec.isolated,
            vms=users.get(rec.name, []),
        )

    async def create(self, spec: NetworkCreate) -> NetworkView:
        spec.check()
        entries = await self._entries()
        for _, other in entries:
            if other.name == spec.name:
                raise AlreadyExists(f"a network named {spec.name!r} already exists")
            if spec.vlan is not None and other.vlan == spec.vlan:
                raise Conflict(f"VLAN {spec.vlan} already carries network {other.name!r}; a VLAN carries one network")
        rec = NetworkRecord(name=spec.name, vlan=spec.vlan, description=spec.description, departments=spec.departments,
                            isolated=spec.isolated)  # fmt: skip
        try:
            rev = await self.store.create(network_key(spec.name), rec.model_dump(mode="json"))
        except StoreConflict:
            raise AlreadyExists(f"a network named {spec.name!r} already exists") from None
        if spec.vlan is not None:
            for e, other in await self._entries():
                if other.name != spec.name and other.vlan == spec.vlan and e.mod_rev < rev:
                    with contextlib.suppress(StoreConflict):
                        await self.store.delete(network_key(spec.name), expect_rev=rev)
                    raise Conflict(
                        f"VLAN {spec.vlan} already carries network {other.name!r}; a VLAN carries one network"
                    )
        return self._view(rec, {})

    async def list(self) -> list[NetworkView]:
        users = await self._users()
        return [self._view(rec, users) for _, rec in await self._entries()]

    async def _entry(self, name: str) -> tuple[Entry, NetworkRecord]:
        validate_name(name, "network")
        if name == USER_NETWORK:
            raise NotFound(f"{USER_NETWORK!r} is the built-in NAT network; it has no record")
        e = await self.store.get(network_key(name))
        if e is None:
            raise NotFound(f"no network named {name!r}")
        return e, NetworkRecord.model_validate(e.value)

    async def get(self, name: str) -> NetworkView:
        _, rec = await self._entry(name)
        return self._view(rec, await self._users())

    async def delete(self, name: str) -> NetworkView:
        """Delete a network no VM uses (its bridges stay on the hosts until they restart)."""
        validate_name(name, "network")
        if name == USER_NETWORK:
            raise InvalidSpec(f"the built-in network {USER_NETWORK!r} cannot be deleted", field="network")
        e, rec = await self._entry(name)
        if not rec.deleting:
            try:
                rev = await self.store.put(
                    network_key(name), rec.model_copy(update={"deleting": True}).model_dump(mode="json"),
                    expect_rev=e.mod_rev,
                )  # fmt: skip
            except StoreConflict:
                raise Conflict(f"network {name!r} changed meanwhile; try again") from None
        else:
            rev = e.mod_rev
        users = (await self._users()).get(name, [])
        if users:
            with contextlib.suppress(StoreConflict):
                await self.store.put(network_key(name), rec.model_dump(mode="json"), expect_rev=rev)
            shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
            vms = "VMs" if len(users) > 1 else "VM"
            raise WrongState(f"network {name!r} is in use by {vms} {shown}; delete them first")
        await self.store.delete(network_key(name))
        return self._view(rec, {})

    async def update(self, name: str, upd: NetworkUpdate) -> NetworkView:
        """Set which departments' VMs may use the network; refused while a VM of another one is on it."""
        e, rec = await self._entry(name)
        new = rec.model_copy(update={"departments": upd.departments})
        outside = sorted(
            f"{r.name} ({r.department})"
            for r in (VMRecord.model_validate(x.value) for x in await self.store.range("vms/"))
            if any(n.network == name for n in r.nics) and not new.allows(r.department)
        )
        if outside:
            shown = ", ".join(outside[:10]) + (f" and {len(outside) - 10} more" if len(outside) > 10 else "")
            raise WrongState(f"network {name!r} carries VMs of other departments: {shown}; move or delete them first")
        try:
            await self.store.put(network_key(name), new.model_dump(mode="json"), expect_rev=e.mod_rev)
        except StoreConflict:
            raise Conflict(f"network {name!r} changed meanwhile; try again") from None
        return self._view(new, await self._users())

    async def resolve(
        self, name: str, department: str | None = None, scope: Collection[str] | None = None
    ) -> int | None:
        """The VLAN of the network a new NIC of a VM of ``department`` goes on (None: untagged, or ``user``);
        refuses an unknown one, and one the department may not use. ``scope``: the departments the asking
        user is confined to (None: not confined); a network they may not use is unknown to them."""
        validate_name(name, "network")
        if name == USER_NETWORK:
            return None
        e = await self.store.get(network_key(name))
        rec = NetworkRecord.model_validate(e.value) if e is not None else None
        if rec is None or rec.deleting or not rec.visible_to(scope):
            known = sorted(r.name for _, r in await self._entries() if not r.deleting and r.visible_to(scope))
            listing = f"networks: {', '.join([USER_NETWORK, *known])}"
            make = "" if scope is not None else f"; make one with: kasou network create {name} [--vlan N]"
            raise InvalidSpec(f"unknown network {name!r} ({listing}{make})", field="network")
        self.check_allows(rec, department)
        return rec.vlan

    async def is_isolated(self, name: str) -> bool:
        """Is ``name`` an isolated network (its NICs never reach the uplink)? False for an unknown one."""
        if name == USER_NETWORK:
            return False
        e = await self.store.get(network_key(name))
        return e is not None and bool(NetworkRecord.model_validate(e.value).isolated)

    @staticmethod
    def check_allows(rec: NetworkRecord, department: str | None) -> None:
        if not rec.allows(department):
            only = ", ".join(rec.departments or [])
            raise InvalidSpec(
                f"network {rec.name!r} is for departments {only} only; a VM of department {department!r} "
                f"cannot use it (an administrator changes that with: kasou network set {rec.name} --department ...)",
                field="network",
            )

    async def check_department(self, names: Collection[str], department: str | None) -> None:
        """Refuse moving a VM with NICs on ``names`` to ``department`` if one of them does not allow it."""
        for name in names:
            if name == USER_NETWORK:
                continue
            e = await self.store.get(network_key(name))
            if e is not None:
                self.check_allows(NetworkRecord.model_validate(e.value), department)

    async def usable(self, name: str) -> bool:
        """After a VM record naming ``name`` was written: is the network still there (not being deleted)?"""
        if name == USER_NETWORK:
            return True
        e = await self.store.get(network_key(name))
        return e is not None and not NetworkRecord.model_validate(e.value).deleting
