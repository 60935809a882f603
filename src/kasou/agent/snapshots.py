"""The agent's side of snapshots: a running VM's through its driver, a stopped VM's with ``qemu-img``.

The layer model is in :mod:`kasou.hypervisor.snapshots`. The agent names the
files (beside each disk's active layer: ``<disk>.<snapshot>.qcow2`` and
``<snapshot>.vmstate``), touches only paths inside its disk directories, and
removes a layer once it is merged. A failed step leaves no new file behind.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kasou.agent.storage import LocalDisks
from kasou.errors import Conflict, InvalidSpec, NotFound, WrongState
from kasou.hypervisor.base import Driver, LaunchSpec, RuntimeInfo, RuntimeState
from kasou.hypervisor.snapshots import (
    SnapshotLayers,
    SnapshotMerge,
    SnapshotMerged,
    SnapshotRestore,
    SnapshotRevert,
    SnapshotTake,
    SnapshotTaken,
    allocated,
    commit_offline,
    create_overlay,
    overlay_path,
)
from kasou.model.names import validate_name

_RUNS = (RuntimeState.RUNNING, RuntimeState.PAUSED, RuntimeState.SHUTTING_DOWN)


class AgentSnapshots:
    def __init__(self, driver: Driver, disks: LocalDisks) -> None:
        self.driver = driver
        self.disks = disks

    def _inside(self, path: str) -> Path:
        return self.disks.check_disk_path(path)

    async def _runs(self, name: str) -> bool:
        """True if the VM's QEMU runs here; refused while it migrates in."""
        info = await self.driver.info(name)
        if info is not None and info.state == RuntimeState.INCOMING:
            raise WrongState(f"VM {name!r} is arriving by migration on this host")
        return info is not None and info.state in _RUNS

    async def take(self, name: str, req: SnapshotTake) -> SnapshotTaken:
        validate_name(req.snapshot, "snapshot")
        for d in req.disks:
            if not self._inside(d.path).exists():
                raise NotFound(f"disk {d.id} of VM {name!r} ({d.path}) does not exist on this host")
        if await self._runs(name):
            return await self.driver.snapshot(name, req)
        if req.memory:
            raise WrongState(f"VM {name!r} is not running; a memory snapshot needs a running guest")
        made: list[Path] = []
        try:
            layers = []
            for d in req.disks:
                ov = overlay_path(d.path, d.id, req.snapshot)
                if ov.exists():
                    raise Conflict(f"{ov} exists already; a snapshot of that name was not cleaned up")
                made.append(ov)
                await create_overlay(d.path, ov)
                layers.append(SnapshotLayers(id=d.id, base=d.path, overlay=str(ov)))
        except BaseException:
            for p in made:
                p.unlink(missing_ok=True)
            raise
        size = sum([await allocated(d.path) for d in req.disks])
        return SnapshotTaken(snapshot=req.snapshot, disks=layers, size_bytes=size)

    async def merge(self, name: str, req: SnapshotMerge) -> SnapshotMerged:
        for d in req.disks:
            for p in (d.top, d.base, d.child):
                if p is not None and not self._inside(p).exists():
                    raise NotFound(f"layer {p} of disk {d.id} of VM {name!r} does not exist on this host")
        if await self._runs(name):
            result = await self.driver.merge_snapshot(name, req)
        else:
            active = {}  # only the disks whose active layer changed (a stopped VM's chain is the record's)
            for d in req.disks:
                await commit_offline(d.top, d.base, d.child)
                if d.child is None:
                    active[d.id] = d.base
            result = SnapshotMerged(disks=active, base_bytes={d.id: await allocated(d.base) for d in req.disks})
        for d in req.disks:  # merged into its base: nothing rests on it any more
            self._inside(d.top).unlink(missing_ok=True)
        return result

    async def revert(self, name: str, req: SnapshotRevert) -> None:
        if await self._runs(name):
            raise Conflict(f"VM {name!r} still runs on this host; stop it before reverting its disks")
        for d in req.disks:
            if not self._inside(d.base).exists():
                raise NotFound(f"the snapshot layer {d.base} of disk {d.id} is missing on this host")
            self._inside(d.overlay)
        for d in req.disks:
            fresh = Path(d.overlay).with_suffix(".new")
            try:
                await create_overlay(d.base, fresh)
                fresh.replace(d.overlay)  # atomic: the old overlay (what was written since) is gone
            finally:
                with contextlib.suppress(OSError):
                    fresh.unlink(missing_ok=True)

    async def restore(self, name: str, req: SnapshotRestore) -> RuntimeInfo:
        spec = LaunchSpec.model_validate(req.spec)
        if spec.name != name:
            raise InvalidSpec(f"spec is for {spec.name!r}, not {name!r}")
        if not self._inside(req.state_path).exists():
            raise NotFound(f"the memory state {req.state_path} is missing on this host")
        for d in spec.disks:
            self._inside(d.path)
        return await self.driver.restore(spec, req.state_path)
