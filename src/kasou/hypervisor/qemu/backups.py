"""Backups of a running VM's disks on QEMU 7.2: ``blockdev-backup`` jobs and persistent dirty bitmaps.

One QMP ``transaction`` per backup fixes the point in time of every disk at once
(QEMU drains the guest's I/O for the length of the transaction: the only
"freeze" the guest sees)::

    full:         block-dirty-bitmap-add NEW (persistent)
                  blockdev-backup sync=full                         -> target (empty qcow2)
    incremental:  block-dirty-bitmap-add NEW (persistent)
                  block-dirty-bitmap-disable BASE
                  blockdev-backup sync=bitmap bitmap=BASE bitmap-mode=never
                                                                    -> target (qcow2, backing: previous generation)

``BASE`` is the bitmap named after the previous generation: it recorded every
write since then, and is frozen at the point in time while ``NEW`` starts
recording. QEMU never changes a bitmap on its own here (``bitmap-mode: never``):
after the job succeeded BASE is removed and NEW remains, named after this
generation; after a failure NEW is merged back into BASE, BASE recording again,
and NEW removed, so the next incremental is still exact. A bitmap whose name is
not the latest recorded generation's is never used: it is removed, and an
``incremental`` request with no usable bitmap (none, one that stopped recording,
or one QEMU marks inconsistent after a crash) makes a full backup and says so.

**Mirrored disks.** QEMU 7.2 refuses a second block job on a node a mirror job
holds ("Node is busy: block device is in use by block job: mirror"); a bitmap
can still be added there. Such a disk is copied at the level of its file: a
backup job on the qcow2 file's own node (which no job holds) copies the file as
it was at the point in time, a crash-consistent qcow2, which is then converted
to a clean self-contained generation. That is always a full backup (noted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kasou.errors import HypervisorError, KasouError, MonitorError, OperationTimeout
from kasou.hypervisor import imagefiles
from kasou.hypervisor.backups import BITMAP_PREFIX, BackupDisk, BackupDiskResult
from kasou.hypervisor.qemu import blocknodes
from kasou.hypervisor.qemu.migration import Execute
from kasou.hypervisor.qemu.qga import Quiesce

log = logging.getLogger(__name__)

POLL_S = 0.2
CANCEL_S = 10.0
FORMATS = ("qcow2", "raw")  # format drivers; anything else above them is a filter (mirror_top, throttle, ...)


@dataclass
class Plan:
    disk: BackupDisk
    node: str  # the disk's format node
    source: str  # the node the job reads: ``node``, or its file node (mirrored disk)
    mode: Literal["full", "incremental", "file"]
    size: int  # the target's size: the disk's virtual size, or its file's length (mode "file")
    fmt: str
    note: str
    target_node: str
    job: str
    new_bitmap: str | None = None
    base_bitmap: str | None = None  # frozen during an incremental; removed after any success

    @property
    def scratch(self) -> Path:
        """Mode "file": the point-in-time copy of the disk's qcow2 file, before its conversion."""
        return Path(f"{self.disk.target}.part")


def names(backup_id: str, disk_id: str) -> tuple[str, str]:
    """The target's node name and the job id (QEMU allows 31 characters; disk ids have at most 22)."""
    return f"bk{backup_id[:5]}-{disk_id}", f"bj{backup_id[:5]}-{disk_id}"


def format_node(graph: dict[str, Any], named: dict[str, dict[str, Any]], start: str) -> str:
    """The first format node at or below ``start`` (filters have one child: ``file`` or ``backing``)."""
    by_name = {str(n["name"]): int(n["id"]) for n in graph.get("nodes", []) if n.get("type") == "block-driver"}
    by_id = {v: k for k, v in by_name.items()}
    node = start
    for _ in range(16):
        if str(named.get(node, {}).get("drv")) in FORMATS:
            return node
        nid = by_name.get(node)
        kids = [e for e in graph.get("edges", []) if e.get("parent") == nid and e.get("name") in ("file", "backing")]
        if nid is None or len(kids) != 1:
            break
        node = by_id.get(int(kids[0]["child"]), "")
    raise HypervisorError(f"cannot find the format node under block node {start!r}")


def held_by_job(graph: dict[str, Any], node: str) -> bool:
    """True if a block job holds ``node`` (e.g. a mirror: QEMU then refuses another job on it)."""
    ids = {str(n["name"]): int(n["id"]) for n in graph.get("nodes", []) if n.get("type") == "block-driver"}
    jobs = {int(n["id"]) for n in graph.get("nodes", []) if n.get("type") == "block-job"}
    nid = ids.get(node)
    return any(e.get("parent") in jobs and e.get("child") == nid for e in graph.get("edges", []))


def file_child(graph: dict[str, Any], node: str) -> str:
    ids = {str(n["name"]): int(n["id"]) for n in graph.get("nodes", []) if n.get("type") == "block-driver"}
    names_ = {v: k for k, v in ids.items()}
    for e in graph.get("edges", []):
        if e.get("parent") == ids.get(node) and e.get("name") == "file":
            return names_[int(e["child"])]
    raise HypervisorError(f"block node {node!r} has no file node")


def decide(
    disk: BackupDisk, fmt: str, bitmaps: dict[str, dict[str, Any]], busy: bool
) -> tuple[Literal["full", "incremental", "file"], str]:
    """Full, incremental or (a mirrored disk) a copy of its file, and why an incremental request was not one."""
    wanted = disk.backing is not None
    if busy:
        return "file", (
            "the disk is mirrored (a block job holds it and QEMU 7.2 allows no second job on it): "
            "a full point-in-time copy of its file"
        )
    if not wanted:
        return "full", ""
    base = bitmaps.get(disk.base_bitmap or "")
    if fmt != "qcow2":
        why = f"a {fmt} disk keeps no persistent dirty bitmap"
    elif disk.base_bitmap is None or base is None:
        why = "its dirty bitmap is missing (a new or replaced disk, a migration, or a snapshot since)"
    elif base.get("inconsistent"):
        why = "its dirty bitmap is inconsistent (QEMU did not stop cleanly)"
    elif not base.get("recording", False):
        why = "its dirty bitmap stopped recording (an interrupted backup)"
    else:
        return "incremental", ""
    return "full", f"full backup instead of incremental: {why}"


async def run(
    execute: Execute, backup_id: str, disks: list[BackupDisk], timeout_s: float, quiesce: Quiesce | None = None
) -> list[BackupDiskResult]:
    """Back up every disk at one point in time; on failure nothing of this backup is left (files, nodes, jobs).

    ``quiesce`` freezes the guest's file systems for the transaction only (the point in time): the copy
    that follows reads the disks as they were then while the guest runs on, thawed.
    """
    plans = await _plan(execute, backup_id, disks)
    added: list[str] = []
    started = False
    try:
        for p in plans:
            if p.mode == "file":
                p.scratch.parent.mkdir(parents=True, exist_ok=True)
                with open(p.scratch, "xb") as f:
                    f.truncate(p.size)
                target = {"driver": "raw", "file": {"driver": "file", "filename": str(p.scratch)}}
            else:
                backing = Path(p.disk.backing).name if p.mode == "incremental" and p.disk.backing else None
                await imagefiles.create(Path(p.disk.target), p.size, backing)
                target = {"driver": "qcow2", "file": {"driver": "file", "filename": p.disk.target}}
            await execute("blockdev-add", {"node-name": p.target_node, **target})
            added.append(p.target_node)
        started = True
        consistency: Literal["application", "crash"] = "crash"
        if quiesce is not None:
            async with quiesce() as frozen:
                await execute("transaction", {"actions": _actions(plans)})
                consistency = "application" if frozen[0] == "application" else "crash"
        else:
            await execute("transaction", {"actions": _actions(plans)})
        copied = await _wait(execute, plans, timeout_s)
        await _del_nodes(execute, added)
        added = []
        for p in plans:
            if p.mode == "file":
                await imagefiles.convert(p.scratch, Path(p.disk.target))
                p.scratch.unlink(missing_ok=True)
    except BaseException:
        await _undo(execute, plans, added, bitmaps_added=started)
        raise
    for p in plans:  # done: the previous generation's bitmap has served
        if p.base_bitmap is not None:
            with contextlib.suppress(KasouError):
                await execute("block-dirty-bitmap-remove", {"node": p.node, "name": p.base_bitmap})
    return [
        BackupDiskResult(
            disk_id=p.disk.disk_id,
            kind="incremental" if p.mode == "incremental" else "full",
            target=p.disk.target,
            backing=p.disk.backing if p.mode == "incremental" else None,
            bitmap=p.new_bitmap,
            bytes_copied=copied.get(p.job, 0),
            note=p.note,
            consistency=consistency,
        )
        for p in plans
    ]


async def _plan(execute: Execute, backup_id: str, disks: list[BackupDisk]) -> list[Plan]:
    graph = await execute("x-debug-query-block-graph")
    named = {str(n["node-name"]): n for n in await execute("query-named-block-nodes", {"flat": True})}
    plans = []
    for d in disks:
        if Path(d.target).exists():
            raise HypervisorError(f"backup target {d.target} already exists")
        top = await blocknodes.top_node(execute, d.disk_id)
        node = format_node(graph, named, str(top["node-name"]))
        info = named.get(node, {})
        fmt = str(info.get("drv"))
        bitmaps = {str(b["name"]): b for b in info.get("dirty-bitmaps") or [] if b.get("name")}
        for name, b in bitmaps.items():  # stale: of a generation that is not the latest, or of a failed attempt
            if name.startswith(BITMAP_PREFIX) and name != d.base_bitmap and not b.get("busy"):
                await execute("block-dirty-bitmap-remove", {"node": node, "name": name})
        busy = held_by_job(graph, node)
        mode, note = decide(d, fmt, bitmaps, busy)
        target_node, job = names(backup_id, d.disk_id)
        source, size = node, int((info.get("image") or {}).get("virtual-size", 0))
        if mode == "file":
            source = file_child(graph, node)
            size = int((named.get(source, {}).get("image") or {}).get("virtual-size", 0))
        plans.append(
            Plan(
                disk=d, node=node, source=source, mode=mode, size=size, fmt=fmt, note=note,
                target_node=target_node, job=job,
                new_bitmap=d.new_bitmap if fmt == "qcow2" else None,
                base_bitmap=d.base_bitmap if d.base_bitmap in bitmaps else None,
            )
        )  # fmt: skip
    return plans


def _actions(plans: list[Plan]) -> list[dict[str, Any]]:
    actions: list[dict[str, Any]] = []
    for p in plans:
        if p.new_bitmap is not None:
            bitmap = {"node": p.node, "name": p.new_bitmap, "persistent": True}
            actions.append({"type": "block-dirty-bitmap-add", "data": bitmap})
        job: dict[str, Any] = {
            "job-id": p.job, "device": p.source, "target": p.target_node, "sync": "full",
            "auto-finalize": True, "auto-dismiss": False,
        }  # fmt: skip
        if p.disk.speed_bytes_s is not None:
            job["speed"] = p.disk.speed_bytes_s
        if p.mode == "incremental":
            assert p.base_bitmap is not None
            actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": p.node, "name": p.base_bitmap}})
            job.update({"sync": "bitmap", "bitmap": p.base_bitmap, "bitmap-mode": "never"})
        actions.append({"type": "blockdev-backup", "data": job})
    return actions


async def _wait(execute: Execute, plans: list[Plan], timeout_s: float) -> dict[str, int]:
    """Wait (bounded) until every job concluded; the bytes each copied; a failed job raises."""
    ids = {p.job for p in plans}
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = {str(j["id"]): j for j in await execute("query-jobs") if j.get("id") in ids}
        if all(j.get("status") == "concluded" for j in jobs.values()) or not jobs:
            break
        if time.monotonic() > deadline:
            raise OperationTimeout(f"the backup did not finish within {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)
    errors = [f"{jid}: {j['error']}" for jid, j in jobs.items() if j.get("error")]
    if missing := ids - jobs.keys():
        errors.append(f"QEMU lost the backup jobs {', '.join(sorted(missing))}")
    for jid in jobs:
        with contextlib.suppress(KasouError):
            await execute("job-dismiss", {"id": jid})
    if errors:
        raise HypervisorError(f"the backup failed: {'; '.join(errors)}")
    return {jid: int(j.get("total-progress", 0)) for jid, j in jobs.items()}


async def _undo(execute: Execute, plans: list[Plan], nodes: list[str], bitmaps_added: bool) -> None:
    """After a failure: no job, no target node or file, the bitmaps as before the backup."""
    with contextlib.suppress(Exception):
        await _cancel(execute, {p.job for p in plans})
    with contextlib.suppress(Exception):
        await _del_nodes(execute, nodes)
    for p in plans:
        imagefiles.remove(Path(p.disk.target))
        p.scratch.unlink(missing_ok=True)
        if not bitmaps_added:
            continue
        with contextlib.suppress(Exception):
            await _restore_bitmaps(execute, p)


async def _restore_bitmaps(execute: Execute, p: Plan) -> None:
    named = {str(n["node-name"]): n for n in await execute("query-named-block-nodes", {"flat": True})}
    present = {str(b.get("name")) for b in named.get(p.node, {}).get("dirty-bitmaps") or []}
    if p.new_bitmap is None or p.new_bitmap not in present:
        return  # the transaction never ran: nothing changed
    if p.mode == "incremental" and p.base_bitmap in present:
        assert p.base_bitmap is not None
        merge = {"node": p.node, "target": p.base_bitmap, "bitmaps": [p.new_bitmap]}
        await execute("block-dirty-bitmap-merge", merge)
        await execute("block-dirty-bitmap-enable", {"node": p.node, "name": p.base_bitmap})
    await execute("block-dirty-bitmap-remove", {"node": p.node, "name": p.new_bitmap})


async def _cancel(execute: Execute, ids: set[str]) -> None:
    for jid in ids:
        with contextlib.suppress(MonitorError):
            await execute("job-cancel", {"id": jid})
    deadline = time.monotonic() + CANCEL_S
    while time.monotonic() < deadline:
        jobs = [j for j in await execute("query-jobs") if j.get("id") in ids]
        if all(j.get("status") in ("concluded", "null") for j in jobs):
            break
        await asyncio.sleep(POLL_S)
    for jid in ids:
        with contextlib.suppress(MonitorError):
            await execute("job-dismiss", {"id": jid})


async def _del_nodes(execute: Execute, nodes: list[str]) -> None:
    for n in nodes:
        try:
            await execute("blockdev-del", {"node-name": n})
        except MonitorError as e:
            log.warning("cannot remove backup target node %s: %s", n, e.message)
            raise
