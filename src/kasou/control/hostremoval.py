"""The VMs of a host that is gone for good (``kasou cluster remove HOST --drop-vms``).

Their QEMUs cannot be reached and their local disks went with the host, so nothing can stop or delete them the
usual way (an agent must answer for that). The operator who removes the host says they are lost, and then:

* a replicated VM whose replica lives on a host that is up is **moved** there, stopped: the replica stops being
  served and its files become the VM's disks (as HA does before a restart, :mod:`kasou.control.ha`); it starts
  again with ``kasou vm start``. The replica's state when the host died is said (``in_sync`` or not);
* every other VM's record is **dropped**: its uptime history stays in the ledger with a last entry saying why,
  and a backup restores it onto another host (``kasou backup restore``).

A VM with a job (an HA restart under way) is not touched: the removal is refused until the job ends.
"""

from __future__ import annotations

from typing import Any

from kasou.control.base import VMControl
from kasou.control.records import LedgerEvent, VMRecord, vm_key
from kasou.errors import Conflict, KasouError
from kasou.model.cluster import LostVM
from kasou.model.state import VMState


def busy(records: list[VMRecord], host: str) -> list[str]:
    return sorted(f"{r.name} (job {r.job})" for r in records if r.host == host and r.job is not None)


async def give_up(vms: VMControl, host: str, by: str) -> list[LostVM]:
    """Move or drop every VM recorded on ``host`` (gone for good: the caller checked that it is down)."""
    records = [r for r in await vms.records.all() if r.host == host]
    waiting = busy(records, host)
    if waiting:
        raise Conflict(f"VMs on {host} have jobs under way: {', '.join(waiting)}; remove {host} when they end")
    out = []
    for rec in sorted(records, key=lambda r: r.name):
        rep = rec.replica
        if rec.replicated and rep is not None and rep.host != host and vms.agents.is_up(rep.host):
            out.append(await _move(vms, rec, host, rep.host, rep.state, by))
        else:
            out.append(await _drop(vms, rec, host, by))
        for key in await vms.events.active_keys(f"vm-left/{host}/{rec.name}"):
            await vms.events.clear(key)
    return out


async def _move(vms: VMControl, rec: VMRecord, host: str, target: str, state: str, by: str) -> LostVM:
    agent: Any = vms.agents.get(target)
    promotion = await agent.promote_replica(rec.name)  # its files stop being a replica, and stay
    paths = dict(promotion.disks)
    disks = [d.model_copy(update={"path": paths.get(d.id, d.path)}) for d in rec.disks]
    await vms.records.set(rec.name, host=target, state=VMState.STOPPED, started_at=None, disks=disks, replica=None)
    await vms.ledger.record(rec.name, LedgerEvent.STOPPED, target,
                            f"host {host} was removed from the cluster by {by}: moved, stopped, to {target} on its "
                            f"disk replica ({state})")  # fmt: skip
    return LostVM(vm=rec.name, moved_to=target, replica_state=state)


async def _drop(vms: VMControl, rec: VMRecord, host: str, by: str) -> LostVM:
    if rec.state != VMState.STOPPED:
        await vms.ledger.record(rec.name, LedgerEvent.STOPPED, host,
                                f"host {host} was removed from the cluster by {by}")  # fmt: skip
    try:
        await vms.store.delete(vm_key(rec.name))
    except KasouError as e:
        raise Conflict(f"the record of {rec.name} could not be dropped: {e.message}") from None
    return LostVM(vm=rec.name)
