"""Named VM networks (hospital segments such as clinical, imaging, mgmt), kept under ``networks/<name>``.

A network is a name, an optional 802.1Q VLAN and a description. The control plane keeps the
records and their rules: names are unique, a VLAN carries one network, and a network cannot be
deleted while a VM has a NIC on it. The built-in ``user`` network (QEMU's NAT) has no record.
Hosts make the bridges, VLAN ports and taps when a VM on the network starts there
(:mod:`kasou.hypervisor.qemu.network`); a VM's NIC records its network and VLAN when it is
created, so both travel with it.

A delete and a VM create cannot race into a VM on a deleted network: the delete first marks
the record ``deleting`` (compare-and-swap), then looks for VMs on it; a create first writes its
VM record, then reads the network again and backs out if it is marked or gone. Whichever of the
two comes second sees the other. Two creates of one VLAN are settled the same way: after
writing, each looks again, and the later write (higher revision) withdraws.
"""

from __future__ import annotations

import contextlib
import time

from pydantic import BaseModel, Field

from kasou.control.records import VMRecord
from kasou.errors import AlreadyExists, Conflict, InvalidSpec, NotFound, StoreConflict, WrongState
from kasou.model.spec import USER_NETWORK, NetworkCreate, validate_name
from kasou.store.base import Entry, Store


def network_key(name: str) -> str:
    return f"networks/{name}"


class NetworkRecord(BaseModel):
    name: str
    vlan: int | None = None
    description: str = ""
    created_at: float = Field(default_factory=time.time)
    deleting: bool = False  # a delete is checking that no VM uses it; VM creates refuse it meanwhile


class NetworkView(BaseModel):
    """A network as the API and the CLI show it."""

    name: str
    vlan: int | None
    description: str
    created_at: float
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
        rec = NetworkRecord(name=spec.name, vlan=spec.vlan, description=spec.description)
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

    async def resolve(self, name: str) -> int | None:
        """The VLAN of the network a new NIC goes on (None: untagged, or ``user``); refuses an unknown one."""
        validate_name(name, "network")
        if name == USER_NETWORK:
            return None
        e = await self.store.get(network_key(name))
        rec = NetworkRecord.model_validate(e.value) if e is not None else None
        if rec is None or rec.deleting:
            known = sorted(r.name for _, r in await self._entries() if not r.deleting)
            listing = f"networks: {', '.join([USER_NETWORK, *known])}"
            raise InvalidSpec(
                f"unknown network {name!r} ({listing}; make one with: kasou network create {name} [--vlan N])",
                field="network",
            )
        return rec.vlan

    async def usable(self, name: str) -> bool:
        """After a VM record naming ``name`` was written: is the network still there (not being deleted)?"""
        if name == USER_NETWORK:
            return True
        e = await self.store.get(network_key(name))
        return e is not None and not NetworkRecord.model_validate(e.value).deleting
