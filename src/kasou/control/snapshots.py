"""Snapshots in the control plane: create, list, revert and delete, each a job that holds its VM.

The disk layer model is in :mod:`kasou.hypervisor.snapshots`; the records are
kept in the VM's own record (``VMRecord.snapshots``, oldest first), so a VM's
disk paths and its snapshots change together in one compare-and-swap.

Rules (the same for the CLI and the API):

* **Create** works on a running, paused or stopped VM (a stopped one with
  ``qemu-img``). ``memory`` needs a running guest; the guest stands still while its
  RAM is saved (well under a second for a small guest).
* **Revert** goes to the *newest* snapshot only (chains are linear; delete the
  newer ones first to go further back). A memory snapshot brings the guest back
  running at the saved instant (the VM is started if it was stopped). A disk-only
  snapshot of a running VM stops it and starts it again on the reverted disk
  (a reboot from the disk of that moment); a stopped VM stays stopped.
* **Delete** merges the snapshot's overlay into its base while the VM runs
  (``block-commit``) or with ``qemu-img`` when it does not; the chain gets one
  layer shorter. If a merge fails half-way the snapshot stays, marked
  ``deleting`` (its content is no longer whole; revert refuses it); delete it again.
* Refused: templates (linked clones rest on their disks), replicated VMs and
  mirrored disks (their mirror jobs), a VM busy with another job, a migration of
  a VM that has snapshots (its layers live on its host).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kasou.control.jobs import JobContext
from kasou.control.records import JobRecord, LedgerEvent, VMRecord
from kasou.errors import AlreadyExists, Conflict, KasouError, NotFound, WrongState
from kasou.hypervisor.snapshots import (
    SnapshotDiskNow,
    SnapshotLayers,
    SnapshotMerge,
    SnapshotMergeDisk,
    SnapshotRevert,
    SnapshotTake,
    memory_path,
    overlay_path,
)
from kasou.model.snapshots import SnapshotCreate, SnapshotDisk, SnapshotRecord, newer_than, validate_snapshot_name
from kasou.model.state import ACTIVE_STATES, VMState

if TYPE_CHECKING:
    from kasou.control.base import VMControl

log = logging.getLogger(__name__)

#: VM states a snapshot operation may start from.
_USABLE = frozenset({VMState.RUNNING, VMState.PAUSED, VMState.STOPPED, VMState.CRASHED})
_LIVE = frozenset({VMState.RUNNING, VMState.PAUSED})


class SnapshotView(BaseModel):
    """A snapshot as the API and the CLI show it."""

    vm: str
    name: str
    created_at: float
    description: str
    memory: bool
    size_bytes: int  # what keeping it costs: its disk layers (allocated) plus the memory state
    memory_bytes: int
    vm_state: str  # the VM's state when it was taken
    consistency: str | None = None  # application, crash or memory (a running VM's); None: a stopped VM's
    state: str  # ready, or deleting (a merge failed half-way: delete it again)
    error: str | None
    newest: bool  # the one a revert goes to


def _view(vm: str, s: SnapshotRecord, newest: bool) -> SnapshotView:
    return SnapshotView(
        vm=vm, name=s.name, created_at=s.created_at, description=s.description, memory=s.memory,
        size_bytes=s.size_bytes, memory_bytes=s.memory_bytes, vm_state=s.vm_state, state=s.state, error=s.error,
        newest=newest, consistency=s.consistency,
    )  # fmt: skip


def _find(rec: VMRecord, snapshot: str) -> SnapshotRecord:
    for s in rec.snapshots:
        if s.name == snapshot:
            return s
    raise NotFound(f"VM {rec.name!r} has no snapshot {snapshot!r}")


def _check_vm(rec: VMRecord, what: str) -> None:
    """Refusals that hold for every snapshot operation (no side effect)."""
    if rec.job is not None:
        raise WrongState(f"VM {rec.name!r} is busy with job {rec.job}; try again when it ends", job=rec.job)
    if rec.state == VMState.TEMPLATE:
        raise WrongState(f"cannot {what} VM {rec.name!r}: it is a template (linked clones rest on its disks)")
    if rec.state not in _USABLE:
        raise WrongState(f"cannot {what} VM {rec.name!r} while it is {rec.state.value}")
    if rec.replicated or rec.replica is not None:
        raise Conflict(
            f"cannot {what} VM {rec.name!r}: its disks are replicated to another host, "
            "and snapshots of replicated disks are not supported yet"
        )
    mirrored = [d.id for d in rec.disks if getattr(d, "mirror", None) is not None]
    if mirrored:
        raise Conflict(
            f"cannot {what} VM {rec.name!r}: disk {', '.join(mirrored)} is mirrored (RAID-1), "
            "and snapshots of mirrored disks are not supported yet"
        )
    if not rec.disks or any(not d.path for d in rec.disks):
        raise WrongState(f"VM {rec.name!r} has no disk to snapshot")


class Snapshots:
    def __init__(self, vms: VMControl) -> None:
        self.vms = vms

    # -- reading ---------------------------------------------------------------------------

    async def list(self, vm: str) -> list[SnapshotView]:
        rec = await self.vms.records.get(vm)
        n = len(rec.snapshots)
        return [_view(vm, s, i == n - 1) for i, s in enumerate(rec.snapshots)]

    async def get(self, vm: str, snapshot: str) -> SnapshotView:
        validate_snapshot_name(snapshot)
        rec = await self.vms.records.get(vm)
        s = _find(rec, snapshot)
        return _view(vm, s, rec.snapshots[-1].name == s.name)

    # -- claims ----------------------------------------------------------------------------

    async def _claim(self, vm: str, job_id: str, check: Any) -> VMRecord:
        """Hold the VM for ``job_id`` if ``check(record)`` (which raises to refuse) still passes."""

        def apply(r: VMRecord) -> VMRecord:
            check(r)
            return r.model_copy(update={"job": job_id})

        rec = await self.vms.records.update(vm, apply)
        assert rec is not None
        return rec

    # -- create ----------------------------------------------------------------------------

    async def create(self, vm: str, spec: SnapshotCreate) -> JobRecord:
        validate_snapshot_name(spec.name)

        def check(r: VMRecord) -> None:
            _check_vm(r, "snapshot")
            if any(s.name == spec.name for s in r.snapshots):
                raise AlreadyExists(f"VM {vm!r} already has a snapshot named {spec.name!r}")
            if spec.memory and r.state != VMState.RUNNING:
                raise WrongState(
                    f"a memory snapshot needs a running guest; VM {vm!r} is {r.state.value}"
                    + (" (resume it first)" if r.state == VMState.PAUSED else "")
                )

        check(await self.vms.records.get(vm))
        job_id = _job_id()
        rec = await self._claim(vm, job_id, check)

        async def run(ctx: JobContext) -> dict[str, Any]:
            agent = self.vms.agents.get(rec.host)
            await ctx.progress(0.1, "saving memory and switching disks" if spec.memory else "switching disks")
            req = SnapshotTake(
                snapshot=spec.name, disks=[SnapshotDiskNow(id=d.id, path=d.path or "") for d in rec.disks],
                memory=spec.memory,
            )  # fmt: skip
            intent = _intent(rec, spec)  # written first: a control plane that dies meanwhile recovers from it
            await self.vms.records.update(vm, lambda r: r.model_copy(update={"snapshots": [*r.snapshots, intent]}))
            try:
                taken = await agent.take_snapshot(vm, req)
            except BaseException:
                await self.vms.records.update(vm, lambda r: _without_intent(r, spec.name))
                raise
            snap = SnapshotRecord(
                name=spec.name, description=spec.description, memory=spec.memory, memory_path=taken.memory_path,
                memory_bytes=taken.memory_bytes, size_bytes=taken.size_bytes, vm_state=rec.state.value,
                consistency=taken.consistency,
                disks=[SnapshotDisk(id=d.id, base=d.base, overlay=d.overlay) for d in taken.disks],
            )  # fmt: skip
            overlays = {d.id: d.overlay for d in taken.disks}
            try:
                await self.vms.records.update(
                    vm, lambda r: _with_snapshot(_without_intent(r, spec.name), snap, overlays)
                )
            except BaseException:
                await self._undo_take(rec, taken.disks, taken.memory_path)
                with contextlib.suppress(KasouError):
                    await self.vms.records.update(vm, lambda r: _without_intent(r, spec.name))
                raise
            await ctx.progress(1.0, "done")
            return {
                "vm": vm, "snapshot": spec.name, "memory": spec.memory, "live": taken.live,
                "paused_ms": taken.paused_ms, "size_bytes": taken.size_bytes, "consistency": taken.consistency,
            }  # fmt: skip

        return await self.vms.runner.submit("snapshot", vm, run, job_id)

    async def recover(self, rec: VMRecord) -> None:
        """At a start of the control plane: settle snapshots left ``taking`` by one that died while taking them.

        If every new layer exists on the VM's host, the agent took the snapshot: the VM runs (or will
        boot) on those layers, so they are adopted and the snapshot kept. Otherwise nothing was taken
        (a failed take removes its layers) and the intent is dropped. A host that does not answer
        leaves the intent for the next start; the snapshot cannot be reverted to meanwhile.
        """
        for snap in [s for s in rec.snapshots if s.state == "taking"]:
            agent = self.vms.agents.get(rec.host)
            try:
                present = [await _exists(agent, d.overlay) for d in snap.disks]
                memory = snap.memory and snap.memory_path is not None and await _exists(agent, snap.memory_path)
            except KasouError as e:
                log.error("snapshot %s of VM %s stays unsettled: %s", snap.name, rec.name, e.message)
                continue
            if snap.disks and all(present):
                ready = snap.model_copy(update={"state": "ready", "memory": memory,
                                                "memory_path": snap.memory_path if memory else None})  # fmt: skip
                overlays = {d.id: d.overlay for d in snap.disks}
                adopt = functools.partial(_adopt, name=snap.name, snap=ready, overlays=overlays)
                await self.vms.records.update(rec.name, adopt)
                log.warning("snapshot %s of VM %s was taken as the control plane stopped: kept", snap.name, rec.name)
            else:
                await self.vms.records.update(rec.name, functools.partial(_without_intent, name=snap.name))
                log.warning("snapshot %s of VM %s was not taken as the control plane stopped: dropped",
                            snap.name, rec.name)  # fmt: skip

    async def _undo_take(self, rec: VMRecord, layers: builtins.list[SnapshotLayers], memory_path: str | None) -> None:
        """The snapshot was taken but could not be recorded: merge its overlays back, remove its state file."""
        agent = self.vms.agents.get(rec.host)
        with contextlib.suppress(KasouError):
            merge = [SnapshotMergeDisk(id=d.id, top=d.overlay, base=d.base) for d in layers]
            await agent.merge_snapshot(rec.name, SnapshotMerge(disks=merge))
        if memory_path:
            with contextlib.suppress(KasouError):
                await agent.delete_disk(memory_path)

    # -- revert ----------------------------------------------------------------------------

    async def revert(self, vm: str, snapshot: str) -> JobRecord:
        validate_snapshot_name(snapshot)

        def check(r: VMRecord) -> None:
            _check_vm(r, "revert")
            s = _find(r, snapshot)
            if s.state != "ready":
                raise WrongState(
                    f"snapshot {snapshot!r} of VM {vm!r} is half merged (a delete failed); delete it again"
                )
            newer = newer_than(r.snapshots, snapshot)
            if newer:
                names = ", ".join(x.name for x in newer)
                raise WrongState(
                    f"snapshot {snapshot!r} of VM {vm!r} is not the newest; revert goes to the newest only "
                    f"(delete the newer ones first: {names})"
                )

        check(await self.vms.records.get(vm))
        job_id = _job_id()
        rec = await self._claim(vm, job_id, check)

        async def run(ctx: JobContext) -> dict[str, Any]:
            snap = _find(rec, snapshot)
            agent = self.vms.agents.get(rec.host)
            was_active = rec.state in ACTIVE_STATES
            if was_active:
                await ctx.progress(0.1, "stopping")
                await agent.action(vm, "stop")
                with contextlib.suppress(KasouError):
                    await agent.forget(vm)
                await self.vms.records.set(vm, state=VMState.STOPPED, started_at=None)
                await self.vms.ledger.record(vm, LedgerEvent.STOPPED, rec.host, f"stopped to revert to {snapshot}")
            elif rec.state == VMState.CRASHED:  # its dead QEMU's leftovers go; the VM is stopped from here
                with contextlib.suppress(KasouError):
                    await agent.forget(vm)
                await self.vms.records.set(vm, state=VMState.STOPPED, started_at=None)
            await ctx.progress(0.4, "reverting disks")
            layers = [SnapshotLayers(id=d.id, base=d.base, overlay=d.overlay) for d in snap.disks]
            await agent.revert_snapshot(vm, SnapshotRevert(disks=layers))
            cur = await self.vms.records.get(vm)
            if snap.memory and snap.memory_path:
                await ctx.progress(0.6, "restoring the memory state")
                await self._restore(cur, snap)
            elif was_active:
                await ctx.progress(0.6, "starting on the reverted disk")
                await self.vms.start_now(cur, detail=f"started on the disk of snapshot {snapshot}")
            state = (await self.vms.records.get(vm)).state
            return {"vm": vm, "snapshot": snapshot, "memory": snap.memory, "state": state.value}

        return await self.vms.runner.submit("revert", vm, run, job_id)

    async def _restore(self, rec: VMRecord, snap: SnapshotRecord) -> None:
        """Start the VM from the snapshot's memory state (as ``VMService.start_now`` starts it from boot)."""
        assert snap.memory_path is not None
        await self.vms.admit(rec)
        await self.vms.records.set(rec.name, state=VMState.STARTING)
        try:
            info = await self.vms.agents.get(rec.host).restore(rec.name, self.vms.launch_spec(rec), snap.memory_path)
        except BaseException:
            await self.vms.records.set(rec.name, state=VMState.STOPPED)
            raise
        await self.vms.records.set(
            rec.name, state=VMState.RUNNING, started_at=info.started_at or time.time(), last_error=None,
            ha_armed=rec.ha,
        )  # fmt: skip
        detail = f"restored running from memory snapshot {snap.name}"
        await self.vms.ledger.record(rec.name, LedgerEvent.STARTED, rec.host, detail)

    # -- delete ----------------------------------------------------------------------------

    async def delete(self, vm: str, snapshot: str) -> JobRecord:
        validate_snapshot_name(snapshot)

        def check(r: VMRecord) -> None:
            _check_vm(r, "delete a snapshot of")
            if _find(r, snapshot).state == "taking":
                raise WrongState(
                    f"snapshot {snapshot!r} of VM {vm!r} is still being settled after a restart of the control "
                    "plane (its host did not answer); try again when the host is back"
                )

        check(await self.vms.records.get(vm))
        job_id = _job_id()
        rec = await self._claim(vm, job_id, check)

        async def run(ctx: JobContext) -> dict[str, Any]:
            snap = _find(rec, snapshot)
            newer = newer_than(rec.snapshots, snapshot)
            agent = self.vms.agents.get(rec.host)
            await self.vms.records.update(vm, lambda r: _mark(r, snapshot, "deleting", None))
            merge = []
            for d in snap.disks:
                child = next((x for n in newer[:1] for x in n.disks if x.id == d.id), None)
                merge.append(
                    SnapshotMergeDisk(id=d.id, top=d.overlay, base=d.base, child=child.overlay if child else None)
                )
            await ctx.progress(0.1, "merging")
            try:
                merged = await agent.merge_snapshot(vm, SnapshotMerge(disks=merge))
            except KasouError as e:
                why = e.message
                with contextlib.suppress(KasouError):
                    await self.vms.records.update(vm, lambda r: _mark(r, snapshot, "deleting", why))
                raise
            if snap.memory_path:
                with contextlib.suppress(NotFound):
                    await agent.delete_disk(snap.memory_path)
            await self.vms.records.update(vm, lambda r: _without_snapshot(r, snapshot, merged.disks, merged.base_bytes))
            return {"vm": vm, "snapshot": snapshot, "deleted": True, "live": merged.live}

        return await self.vms.runner.submit("snapshot-delete", vm, run, job_id)

    # -- the VM goes away ------------------------------------------------------------------

    async def delete_files(self, rec: VMRecord) -> None:
        """Remove every layer and state file of the VM's snapshots (its active layers go with its disks)."""
        agent = self.vms.agents.get(rec.host)
        active = {d.path for d in rec.disks}
        paths = []
        for s in rec.snapshots:
            paths += (
                [d.base for d in s.disks] + [d.overlay for d in s.disks] + ([s.memory_path] if s.memory_path else [])
            )
        for p in dict.fromkeys(paths):
            if p not in active:
                with contextlib.suppress(NotFound):
                    await agent.delete_disk(p)


def _intent(rec: VMRecord, spec: SnapshotCreate) -> SnapshotRecord:
    """The snapshot about to be taken, with the paths its layers will have (the agent makes them there)."""
    disks = [SnapshotDisk(id=d.id, base=d.path or "", overlay=str(overlay_path(d.path or "", d.id, spec.name)))
             for d in rec.disks]  # fmt: skip
    state_file = str(memory_path(rec.disks[0].path or "", spec.name)) if spec.memory and rec.disks else None
    return SnapshotRecord(name=spec.name, description=spec.description, memory=spec.memory, memory_path=state_file,
                          vm_state=rec.state.value, disks=disks, state="taking")  # fmt: skip


def _adopt(r: VMRecord, name: str, snap: SnapshotRecord, overlays: dict[str, str]) -> VMRecord:
    return _with_snapshot(_without_intent(r, name), snap, overlays)


def _without_intent(r: VMRecord, name: str) -> VMRecord:
    return r.model_copy(update={"snapshots": [s for s in r.snapshots if not (s.name == name and s.state == "taking")]})


async def _exists(agent: Any, path: str) -> bool:
    try:
        await agent.disk_info(path)
        return True
    except NotFound:
        return False


def _with_snapshot(r: VMRecord, snap: SnapshotRecord, overlays: dict[str, str]) -> VMRecord:
    disks = [d.model_copy(update={"path": overlays.get(d.id, d.path)}) for d in r.disks]
    return r.model_copy(update={"snapshots": [*r.snapshots, snap], "disks": disks})


def _mark(r: VMRecord, snapshot: str, state: str, error: str | None) -> VMRecord:
    snaps = [s.model_copy(update={"state": state, "error": error}) if s.name == snapshot else s for s in r.snapshots]
    return r.model_copy(update={"snapshots": snaps})


def _without_snapshot(r: VMRecord, snapshot: str, active: dict[str, str], base_bytes: dict[str, int]) -> VMRecord:
    """Drop a merged snapshot: the next newer one now rests on its base; the disks' active layers as reported."""
    gone = next(s for s in r.snapshots if s.name == snapshot)
    bases = {d.id: d.base for d in gone.disks}
    tops = {d.overlay for d in gone.disks}
    snaps = []
    for s in r.snapshots:
        if s.name == snapshot:
            continue
        if any(d.base in tops for d in s.disks):  # the next newer one: its base was merged away
            layers = [d.model_copy(update={"base": bases.get(d.id, d.base)}) for d in s.disks]
            size = sum(base_bytes.values()) + s.memory_bytes if base_bytes else s.size_bytes
            s = s.model_copy(update={"disks": layers, "size_bytes": size})
        snaps.append(s)
    disks = [d.model_copy(update={"path": active.get(d.id, d.path)}) for d in r.disks]
    return r.model_copy(update={"snapshots": snaps, "disks": disks})


def _job_id() -> str:
    return "j" + secrets.token_hex(5)
