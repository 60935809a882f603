"""Snapshots of a running QEMU 7.2 over QMP: overlays, the memory state, merges and the restore.

The layer model is in :mod:`kasou.hypervisor.snapshots`. The steps, each bounded::

    take:     [memory: stop]
              qemu-img create -b ACTIVE -u OVERLAY        (per disk; the base is not opened)
              blockdev-add qcow2 OVERLAY (backing: null)  (node D-xxxx, file node D-xxxxf)
              [no memory, guest agent answers: guest-fsfreeze-freeze]
              transaction [blockdev-snapshot node=TOP overlay=D-xxxx, ...]   (all disks at one instant)
              [guest-fsfreeze-thaw, in any case]
              [memory: migrate exec:cat > STATE.part, wait completed, rename; cont]
    merge:    block-commit top-node=TOP base-node=BASE (job snap-D)
                active top: wait ready, block-job-complete (the device pivots onto BASE)
                intermediate: wait concluded (QEMU puts the layer above onto BASE)
              job-dismiss; blockdev-del of the dropped node if the monitor owns it
    restore:  qemu ... -incoming 'exec:cat STATE' -S, wait completed, cont

Why the memory is saved with the vCPUs stopped: the disk layers and the RAM must
show one instant. With the guest stopped, ``stop`` has drained its I/O, the
overlay switch happens, and ``migrate`` (QEMU 7.2 has no ``file:`` URI; an
``exec:`` pipe into ``cat`` writes the stream to a file) sends RAM and device
state in one final pass. The guest stands still for that time (measured: well
under a second for a 128 MiB guest under TCG). A migration leaves the images
inactive; ``cont`` activates them again. A paused VM is refused (there is no
way to activate its images again without running it); resume it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.errors import Conflict, HypervisorError, KasouError, MonitorError, NotFound, OperationTimeout, WrongState
from kasou.hypervisor.qemu import blocknodes as bn
from kasou.hypervisor.qemu.cmdline import RuntimeFiles
from kasou.hypervisor.qemu.migration import Execute, wait_incoming_done
from kasou.hypervisor.qemu.qga import Consistency, Quiesce
from kasou.hypervisor.snapshots import (
    SnapshotLayers,
    SnapshotMerge,
    SnapshotMerged,
    SnapshotTake,
    SnapshotTaken,
    allocated,
    create_overlay,
    memory_path,
    overlay_path,
)

log = logging.getLogger(__name__)

#: Saving the RAM of a stopped guest to a local file (a few GiB at disk speed).
SAVE_TIMEOUT_S = 600.0
#: A commit job that copies nothing for this long has stalled.
COMMIT_STALL_S = 60.0
#: Bandwidth for the memory save (QEMU's default cap is 128 MiB/s, meant for networks).
SAVE_BANDWIDTH = 8 * 1024 * 1024 * 1024
#: The memory save of a stopped guest: the whole state in the final pass, so no downtime limit applies.
POLL_S = 0.05


def job_id(disk_id: str) -> str:
    return f"snap-{disk_id}"


def overlay_nodes(disk_id: str, token: str | None = None) -> tuple[str, str]:
    """Node names of a new overlay: format and file (QEMU allows 31 characters; a disk id has at most 22)."""
    t = token or secrets.token_hex(2)
    return f"{disk_id}-{t}", f"{disk_id}-{t}f"


#: Hands QEMU an open file descriptor under a name (``getfd``), for a ``fd:NAME`` migration URI.
SendFd = Callable[[str, int], Awaitable[None]]
SAVE_FD = "kasou-save"
RESTORE_FD = "kasou-restore"


def snapshot_actions(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """``transaction`` actions putting each overlay node on top of its disk's current top node."""
    return [{"type": "blockdev-snapshot", "data": {"node": top, "overlay": ov}} for top, ov in pairs]


def overlay_blockdev(node: str, file_node: str, path: str) -> dict[str, Any]:
    """``blockdev-add`` of an overlay with no backing yet (``blockdev-snapshot`` attaches it)."""
    return {
        "driver": "qcow2",
        "node-name": node,
        "file": {"driver": "file", "filename": path, "node-name": file_node},
        "backing": None,
    }


def commit_args(disk_id: str, active: str, top: str, base: str) -> dict[str, Any]:
    return {
        "job-id": job_id(disk_id),
        "device": active,
        "top-node": top,
        "base-node": base,
        "auto-dismiss": False,
        "on-error": "report",
    }


def busy_jobs(jobs: list[dict[str, Any]]) -> list[str]:
    """Block jobs that forbid a snapshot or a merge (replication or mirror jobs, a commit in flight)."""
    return sorted(str(j.get("device")) for j in jobs)


async def _refuse_jobs(execute: Execute, vm: str) -> None:
    running = busy_jobs(await execute("query-block-jobs", None))
    if running:
        raise Conflict(
            f"VM {vm!r} has block jobs running ({', '.join(running)}): disks that are mirrored, replicated "
            "or being merged cannot be snapshotted or merged for now"
        )


async def _run_state(execute: Execute) -> str:
    return str((await execute("query-status", None)).get("status", ""))


def update_launch(files: RuntimeFiles, paths: dict[str, str]) -> None:
    """Keep the launch record true: the disks' active layers changed (a restarted agent reads it)."""
    try:
        data = json.loads(files.launch.read_text())
    except (OSError, ValueError):
        return
    for d in data.get("spec", {}).get("disks", []):
        if d.get("id") in paths:
            d["path"] = paths[d["id"]]
    tmp = files.launch.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(files.launch)


@dataclass
class _Added:
    disk_id: str
    old_top: str  # node
    old_path: str
    node: str
    file_node: str
    path: str


async def take(
    execute: Execute,
    vm: str,
    snapshot: str,
    disks: list[tuple[str, str, str]],
    memory: Path | None,
    send_fd: SendFd | None = None,
    quiesce: Quiesce | None = None,
) -> SnapshotTaken:
    """Put an overlay on each disk at one instant (``disks``: id, active path, overlay path); maybe save memory.

    On failure nothing is left: no overlay file or node, no state file, and the guest runs as before.
    ``quiesce`` freezes the guest's file systems around the instant (a disk-only snapshot of a running
    guest); a memory snapshot is never frozen: its saved guest would wake up frozen after a revert.
    """
    await _refuse_jobs(execute, vm)
    was_running = await _run_state(execute) == "running"
    if memory is not None and not was_running:
        raise WrongState(f"VM {vm!r} is not running; a memory snapshot needs a running guest (resume it first)")
    tops: dict[str, dict[str, Any]] = {}
    for disk_id, active, overlay in disks:
        top = await bn.top_node(execute, disk_id)
        if not bn.same_file(str(top.get("file")), active):
            raise HypervisorError(f"disk {disk_id} of VM {vm!r} is {top.get('file')} in QEMU, not {active}")
        if Path(overlay).exists():
            raise Conflict(f"{overlay} exists already; a snapshot of that name was not cleaned up")
        tops[disk_id] = top
    made: list[Path] = []
    added: list[_Added] = []
    switched = False
    stopped = False
    part = memory.with_suffix(".part") if memory is not None else None
    t_stop = time.monotonic()
    try:
        for disk_id, active, overlay in disks:
            size = int(tops[disk_id].get("image", {}).get("virtual-size", 0)) or None
            made.append(Path(overlay))
            await create_overlay(active, overlay, size)
        if memory is not None:
            t_stop = time.monotonic()
            await execute("stop", None)
            stopped = True
        for disk_id, active, overlay in disks:
            node, file_node = overlay_nodes(disk_id)
            await execute("blockdev-add", overlay_blockdev(node, file_node, overlay))
            added.append(_Added(disk_id, str(tops[disk_id]["node-name"]), active, node, file_node, overlay))
        consistency: Consistency | None = "memory" if memory is not None else None
        if memory is None and was_running and quiesce is not None:
            async with quiesce() as frozen:
                await execute("transaction", {"actions": snapshot_actions([(a.old_top, a.node) for a in added])})
                consistency = frozen[0]
        else:
            await execute("transaction", {"actions": snapshot_actions([(a.old_top, a.node) for a in added])})
        switched = True
        memory_bytes = 0
        if memory is not None and part is not None:
            assert send_fd is not None, "a memory snapshot needs a way to hand QEMU the file"
            await _save_memory(execute, send_fd, part)
            part.replace(memory)
            memory_bytes = memory.stat().st_size
            await execute("cont", None)
            stopped = False
        paused_ms = int((time.monotonic() - t_stop) * 1000) if memory is not None else 0
    except BaseException:
        if switched:
            for a in added:
                with contextlib.suppress(KasouError):
                    await merge(execute, vm, a.disk_id, a.path, a.old_path, timeout_s=60)
        else:
            for a in added:
                with contextlib.suppress(KasouError):
                    await execute("blockdev-del", {"node-name": a.node})
        for p in [*made, *([part, memory] if memory is not None and part is not None else [])]:
            p.unlink(missing_ok=True)
        if stopped:
            with contextlib.suppress(KasouError):
                await execute("cont", None)
        raise
    sizes = [await allocated(active) for _, active, _ in disks]
    return SnapshotTaken(
        snapshot=snapshot,
        disks=[SnapshotLayers(id=d, base=active, overlay=ov) for d, active, ov in disks],
        memory_path=str(memory) if memory is not None else None,
        memory_bytes=memory_bytes,
        size_bytes=sum(sizes) + memory_bytes,
        live=True,
        paused_ms=paused_ms,
        consistency=consistency if consistency is not None else "crash",
    )


async def _save_memory(execute: Execute, send_fd: SendFd, path: Path, timeout_s: float = SAVE_TIMEOUT_S) -> None:
    """Send the (stopped) VM's RAM and device state into ``path``; bounded; cancelled on failure.

    The agent opens the file and hands QEMU the descriptor: a sandboxed QEMU may neither open the
    path nor run ``cat`` for an ``exec:`` URI.
    """
    with contextlib.suppress(MonitorError):  # an older QEMU without the parameter: its default cap
        await execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await send_fd(SAVE_FD, fd)
    finally:
        os.close(fd)  # QEMU holds its own copy; it closes it when the migration ends
    await execute("migrate", {"uri": f"fd:{SAVE_FD}"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            q = await execute("query-migrate", None)
            status = str(q.get("status", "none"))
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise HypervisorError(f"saving the memory state failed: {q.get('error-desc') or status}")
            if loop.time() > deadline:
                raise OperationTimeout(f"saving the memory state took longer than {timeout_s:.0f} s")
            await asyncio.sleep(POLL_S)
    except BaseException:
        with contextlib.suppress(KasouError):
            await execute("migrate_cancel", None)
        raise


async def merge(execute: Execute, vm: str, disk_id: str, top: str, base: str, timeout_s: float = 600.0) -> str:
    """Commit layer ``top`` of a running disk into ``base`` (its backing file); returns the active layer after.

    The guest keeps running and writing. An active ``top`` pivots the device onto
    ``base``; an intermediate one leaves the layer above it resting on ``base``.
    """
    cur = await bn.top_node(execute, disk_id)
    layers = await bn.named_layers(execute)
    t, b = _find(layers, top), _find(layers, base)
    if t is None or b is None:
        raise HypervisorError(f"disk {disk_id} of VM {vm!r} has no layer {top if t is None else base} open in QEMU")
    if not bn.same_file(t.backing, b.path):
        raise HypervisorError(f"{top} does not rest on {base} in QEMU (its backing file is {t.backing})")
    active = str(cur["node-name"])
    is_active = t.node == active
    await _refuse_jobs(execute, vm)
    await execute("block-commit", commit_args(disk_id, active, t.node, b.node))
    try:
        await _wait_commit(execute, disk_id, is_active, timeout_s)
    except BaseException:
        await _end_job(execute, disk_id)
        raise
    await _end_job(execute, disk_id)
    for node in (t.node, t.file_node):  # monitor-owned (blockdev-add or -blockdev): dropped by hand
        if node is not None:
            with contextlib.suppress(MonitorError):
                await execute("blockdev-del", {"node-name": node})
    now = await bn.top_node(execute, disk_id)
    return str(now.get("file"))


def _find(layers: dict[str, bn.Layer], path: str) -> bn.Layer | None:
    for p, layer in layers.items():
        if bn.same_file(p, path):
            return layer
    return None


async def _wait_commit(execute: Execute, disk_id: str, is_active: bool, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    t0 = last_move = loop.time()
    best = -1
    completing = False
    while True:
        jobs = await execute("query-block-jobs", None)
        job = next((j for j in jobs if j.get("device") == job_id(disk_id)), None)
        if job is None:
            raise HypervisorError(f"the merge job of disk {disk_id} vanished")
        if job.get("error"):
            raise HypervisorError(f"merging disk {disk_id} failed: {job['error']}")
        status = job.get("status")
        if status == "concluded":
            if is_active and not completing:
                raise HypervisorError(f"the merge of disk {disk_id} ended before it was ready")
            return
        if is_active and job.get("ready") and not completing:
            await execute("block-job-complete", {"device": job_id(disk_id)})
            completing = True
        now = loop.time()
        if int(job.get("offset", 0)) > best:
            best, last_move = int(job.get("offset", 0)), now
        if now - last_move > COMMIT_STALL_S and not job.get("ready"):
            raise OperationTimeout(f"merging disk {disk_id} made no progress for {COMMIT_STALL_S:.0f} s")
        if now - t0 > timeout_s:
            raise OperationTimeout(f"merging disk {disk_id} took longer than {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)


async def _end_job(execute: Execute, disk_id: str, timeout_s: float = 10.0) -> None:
    """Cancel the merge job if it still runs (a cancelled active commit does not pivot), then dismiss it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    cancelled = False
    while True:
        jobs = await execute("query-block-jobs", None)
        job = next((j for j in jobs if j.get("device") == job_id(disk_id)), None)
        if job is None:
            return
        if job.get("status") == "concluded":
            with contextlib.suppress(MonitorError):
                await execute("job-dismiss", {"id": job_id(disk_id)})
            return
        if not cancelled:
            with contextlib.suppress(MonitorError):
                await execute("block-job-cancel", {"device": job_id(disk_id), "force": True})
            cancelled = True
        if loop.time() > deadline:
            raise OperationTimeout(f"the merge job of disk {disk_id} did not end within {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)


# -- the driver's entry points (it holds the VM's lock) -----------------------------------------


async def take_live(
    execute: Execute, send_fd: SendFd, files: RuntimeFiles, vm: str, req: SnapshotTake, quiesce: Quiesce | None = None
) -> SnapshotTaken:
    if not req.disks:
        raise HypervisorError(f"VM {vm!r} has no disk to snapshot")
    disks = [(d.id, d.path, str(overlay_path(d.path, d.id, req.snapshot))) for d in req.disks]
    memory = memory_path(req.disks[0].path, req.snapshot) if req.memory else None
    if memory is not None and memory.exists():
        raise Conflict(f"{memory} exists already; a snapshot of that name was not cleaned up")
    taken = await take(execute, vm, req.snapshot, disks, memory, send_fd, quiesce)
    update_launch(files, {d: ov for d, _, ov in disks})
    return taken


async def merge_live(execute: Execute, files: RuntimeFiles, vm: str, req: SnapshotMerge) -> SnapshotMerged:
    active: dict[str, str] = {}
    try:
        for d in req.disks:
            active[d.id] = await merge(execute, vm, d.id, d.top, d.base, req.timeout_s)
    finally:
        if active:
            update_launch(files, active)
    return SnapshotMerged(disks=active, live=True, base_bytes={d.id: await allocated(d.base) for d in req.disks})


async def finish_restore(
    execute: Execute, send_fd: SendFd, state_path: str, paused: bool, timeout_s: float = SAVE_TIMEOUT_S
) -> None:
    """Read the saved state into the QEMU waiting with ``-incoming defer`` (from a descriptor the agent
    opened), then let the guest run on unless ``paused``."""
    try:
        fd = os.open(state_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NotFound(f"the memory state {state_path} cannot be read: {e.strerror}") from None
    try:
        await send_fd(RESTORE_FD, fd)
    finally:
        os.close(fd)
    await execute("migrate-incoming", {"uri": f"fd:{RESTORE_FD}"})
    await wait_incoming_done(execute, timeout_s)
    if not paused:
        await execute("cont", None)
