"""Mirrored disks (RAID-1 on one host): a second copy of a disk, in another storage pool, kept in sync by QEMU.

The mechanism is the one of replicated disks (:mod:`kasou.hypervisor.qemu.replication`): a
``blockdev-mirror`` job in ``write-blocking`` mode that is never completed while the VM runs,
so every guest write reaches both copies before the guest sees it done. Only the target differs:
a local qcow2 file in the second pool instead of an NBD export on another host. The status model
is the same (``none``, ``syncing``, ``in_sync``, ``degraded``, see
:class:`~kasou.hypervisor.base.MirrorStatus`) and so is the test of a job that stopped keeping its
target in sync (:func:`~kasou.hypervisor.qemu.replication.job_failure`).

Why not ``quorum``: it has no resync (a new child starts empty), so an online rebuild is
impossible with it alone, and it would be a second mechanism beside the replicas'.

What happens when a copy fails::

    second copy (the mirror's target)           the copy the guest runs on (the job's source)
    ---------------------------------           ---------------------------------------------
    write error, full pool: the job ends        write/read error, full pool: the disk has
    (on-target-error=report); QEMU stops        werror=stop,rerror=stop, so QEMU pauses the VM
    writing there; the guest never sees it      (BLOCK_IO_ERROR) instead of failing the request;
                                                the driver completes the (ready) job, which
    file removed: seen by the driver's          pivots the disk onto the second copy, and
    1 s watch (inode gone); the job is          resumes: the request is retried there. The
    cancelled                                   guest only sees a pause of some milliseconds.
                                                file removed: the same pivot, without a pause.

Either way the disk runs on one copy (``degraded``) until ``attach`` gives it a new second copy
(``sync: full``: a full copy while the guest writes). At a start the control plane asks for
``sync: none`` when both copies were in sync at a clean stop (QEMU drains every request before
it exits, and in write-blocking mode each one reached both copies), ``full`` otherwise (after a
crash the copies may differ in the writes that were in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kasou.errors import Conflict, HypervisorError, InvalidSpec, KasouError, MonitorError, OperationTimeout
from kasou.hypervisor.base import LaunchDisk, MirrorStatus, validate_disk_id
from kasou.hypervisor.qemu import runfiles
from kasou.hypervisor.qemu.migration import Execute
from kasou.hypervisor.qemu.replication import job_failure, start_blocking_mirror

RECORD = "mirrors.json"  # in the VM's runtime directory
PIVOT_S = 10.0  # a ready job switches over at once; bounded all the same
CANCEL_S = 10.0

MirrorSync = Literal["none", "full"]


def job_id(disk_id: str) -> str:
    return f"mirror-{disk_id}"


def device_id(disk_id: str) -> str:
    return f"{disk_id}-dev"


@dataclass
class Mirrored:
    """One mirrored disk as this host runs it."""

    disk_id: str
    source: str  # the copy the guest runs on
    target: str | None  # the second copy (None: degraded, no second copy attached)
    since: float
    error: str | None = None  # why the disk runs on one copy
    failed: str | None = None  # the copy that failed (after a switch-over: the old source)
    source_ino: tuple[int, int] | None = None  # (st_dev, st_ino) when attached: a replaced file is a lost copy
    target_ino: tuple[int, int] | None = None
    node: str | None = None  # the target's format node
    generation: int = 0  # counts the target nodes made for this disk (their names must be new)


def load(run_dir: Path) -> dict[str, Mirrored]:
    try:
        data = json.loads((run_dir / RECORD).read_text())
        out = {}
        for d, rec in data.items():
            for k in ("source_ino", "target_ino"):
                rec[k] = tuple(rec[k]) if rec.get(k) else None
            out[d] = Mirrored(**rec)
        return out
    except (OSError, ValueError, TypeError):
        return {}


def save(run_dir: Path, records: dict[str, Mirrored]) -> None:
    runfiles.save_records(run_dir / RECORD, records)


def file_id(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _job(jobs: Sequence[dict[str, Any]], disk_id: str) -> dict[str, Any] | None:
    return next((j for j in jobs if j.get("device") == job_id(disk_id)), None)


def disk_status(disk_id: str, rec: Mirrored | None, job: dict[str, Any] | None) -> MirrorStatus:
    """The mirror state of one disk: the replicas' status model, with local paths."""
    if rec is None:
        return MirrorStatus(disk_id=disk_id, state="none")
    out = MirrorStatus(
        disk_id=disk_id, state="syncing", path=rec.source, second=rec.target, failed=rec.failed, since=rec.since
    )
    why = rec.error if rec.target is None or rec.error else job_failure(job)
    if why is not None:
        return out.model_copy(update={"state": "degraded", "error": why})
    assert job is not None
    if job.get("ready"):
        return out.model_copy(update={"state": "in_sync", "progress": 1.0})
    total, done = int(job.get("len", 0)), int(job.get("offset", 0))
    return out.model_copy(update={"progress": round(min(max(done / total, 0.0), 1.0), 4) if total > 0 else 0.0})


# -- QMP steps ------------------------------------------------------------------------------


async def device_node(execute: Execute, disk_id: str) -> str:
    """The node the disk's device runs on now (after a switch-over it is the old second copy)."""
    for dev in await execute("query-block"):
        qdev = str(dev.get("qdev", ""))
        if qdev == device_id(disk_id) or qdev.startswith(f"/machine/peripheral/{device_id(disk_id)}/"):
            node = (dev.get("inserted") or {}).get("node-name")
            if node:
                return str(node)
    raise HypervisorError(f"the VM has no disk device {device_id(disk_id)}")


async def _io_status(execute: Execute) -> dict[str, str]:
    """disk id -> QEMU's I/O status of its device (``ok``, ``failed``, ``nospace``)."""
    out = {}
    for dev in await execute("query-block"):
        qdev = str(dev.get("qdev", ""))
        name = qdev.removeprefix("/machine/peripheral/").split("/", 1)[0]
        if name.endswith("-dev"):
            out[name.removesuffix("-dev")] = str(dev.get("io-status", "ok"))
    return out


async def attach(
    execute: Execute, run_dir: Path, disks: Sequence[LaunchDisk], disk_id: str, target: str, sync: MirrorSync
) -> MirrorStatus:
    """Give a disk its second copy at ``target`` (an existing qcow2 of the same size) and keep it in sync.

    ``sync: full`` copies the whole disk first (the guest keeps running and writing); ``none`` trusts
    that both copies are equal already. On failure nothing is left attached.
    """
    validate_disk_id(disk_id)
    disk = next((d for d in disks if d.id == disk_id), None)
    if disk is None:
        raise InvalidSpec(f"the VM has no disk {disk_id!r}", field="disk_id")
    if disk.readonly:
        raise InvalidSpec(f"disk {disk_id} is read-only; there is nothing to mirror", field="disk_id")
    records = load(run_dir)
    rec = records.get(disk_id)
    job = _job(await execute("query-block-jobs"), disk_id)
    if rec is not None and rec.target is not None and rec.error is None and job_failure(job) is None:
        if rec.target == target:
            return disk_status(disk_id, rec, job)
        raise Conflict(f"disk {disk_id} is mirrored to {rec.target} already; detach that copy first")
    if rec is not None:  # a degraded disk: tidy what is left of the failed copy's job first
        await _end_job(execute, disk_id)
        await _drop_target(execute, rec)
    if not Path(target).is_file():
        raise InvalidSpec(f"the second copy {target} does not exist", field="mirror")
    source_node = await device_node(execute, disk_id)
    gen = (rec.generation if rec is not None else 0) + 1
    node = f"{disk_id}-c{gen}"
    await execute("blockdev-add", {
        "driver": "qcow2", "node-name": node, "discard": "unmap",
        "file": {"driver": "file", "filename": target, "node-name": f"{node}-file", "discard": "unmap"},
    })  # fmt: skip
    new = Mirrored(
        disk_id=disk_id,
        source=rec.source if rec is not None else disk.path,
        target=target,
        since=time.time(),
        failed=None,
        source_ino=(rec.source_ino if rec is not None else None) or file_id(disk.path),
        target_ino=file_id(target),
        node=node,
        generation=gen,
    )
    started = False
    try:
        await start_blocking_mirror(
            execute, job_id(disk_id), disk_id, source_node, node, sync, "the second copy", "mirror"
        )
        started = True
        records[disk_id] = new
        save(run_dir, records)
    except BaseException:
        if started:
            with contextlib.suppress(KasouError):
                await _end_job(execute, disk_id)
        with contextlib.suppress(KasouError):
            await _drop_nodes(execute, node)
        raise
    return disk_status(disk_id, new, _job(await execute("query-block-jobs"), disk_id))


async def _end_job(execute: Execute, disk_id: str) -> None:
    """Cancel the job (force: the second copy is abandoned) and dismiss it, bounded."""
    with contextlib.suppress(MonitorError):
        await execute("block-job-cancel", {"device": job_id(disk_id), "force": True})
    await _conclude(execute, disk_id, CANCEL_S, f"the mirror of disk {disk_id} did not stop")


async def _conclude(execute: Execute, disk_id: str, limit_s: float, late: str) -> dict[str, Any] | None:
    """Wait (at most ``limit_s``) until the disk's job has ended, then dismiss it; the job as it ended."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        job = _job(await execute("query-block-jobs"), disk_id)
        if job is None or job.get("status") == "concluded":
            break
        if loop.time() - t0 > limit_s:
            raise OperationTimeout(f"{late} within {limit_s:.0f} s")
        await asyncio.sleep(0.01)
    if job is not None:
        with contextlib.suppress(MonitorError):
            await execute("job-dismiss", {"id": job_id(disk_id)})
    return job


async def _drop_nodes(execute: Execute, node: str) -> None:
    nodes = {n.get("node-name") for n in await execute("query-named-block-nodes", {"flat": True})}
    for name in (node, f"{node}-file"):
        if name in nodes:
            await execute("blockdev-del", {"node-name": name})


async def _drop_target(execute: Execute, rec: Mirrored) -> None:
    if rec.node is not None:
        with contextlib.suppress(MonitorError):
            await _drop_nodes(execute, rec.node)


async def detach(execute: Execute, run_dir: Path, disk_id: str) -> None:
    """Stop mirroring one disk and close its second copy; nothing happens if it has none."""
    records = load(run_dir)
    rec = records.pop(disk_id, None)
    if rec is None:
        return
    await _end_job(execute, disk_id)
    await _drop_target(execute, rec)
    save(run_dir, records)


async def status(execute: Execute, run_dir: Path, disks: Sequence[str]) -> list[MirrorStatus]:
    records = load(run_dir)
    jobs = await execute("query-block-jobs") if records else []
    ids = list(disks) + sorted(d for d in records if d not in disks)
    return [disk_status(d, records.get(d), _job(jobs, d)) for d in ids]


async def switch_over(execute: Execute, run_dir: Path, disk_id: str, why: str) -> bool:
    """The copy the guest runs on failed: move the disk onto its in-sync second copy. False if it cannot.

    ``block-job-complete`` of the ready job replaces the source with the target under the
    device; the old source's nodes are then closed.
    """
    records = load(run_dir)
    rec = records.get(disk_id)
    if rec is None or rec.target is None or rec.error is not None:
        return False
    job = _job(await execute("query-block-jobs"), disk_id)
    if job is None or not job.get("ready") or job_failure(job) is not None:
        return False
    old_node = await device_node(execute, disk_id)
    # The record says what the disk is about to be before QEMU is asked, so a status read meanwhile
    # (the control plane, every 2 s) never sees a half-done switch; restored if the switch fails.
    records[disk_id] = Mirrored(
        disk_id=disk_id,
        source=rec.target,
        target=None,
        since=rec.since,
        error=why,
        failed=rec.source,
        source_ino=rec.target_ino,
        node=rec.node,
        generation=rec.generation,
    )
    save(run_dir, records)
    try:
        await execute("block-job-complete", {"device": job_id(disk_id)})
        job = await _conclude(execute, disk_id, PIVOT_S, f"disk {disk_id} did not switch to its second copy")
        if job is not None and job.get("error"):
            raise HypervisorError(f"disk {disk_id} could not switch to its second copy: {job['error']}")
    except BaseException:
        records[disk_id] = rec
        save(run_dir, records)
        raise
    with contextlib.suppress(MonitorError):  # close the failed copy (its file may be gone)
        await _drop_nodes(execute, old_node)
    return True


async def give_up_target(execute: Execute, run_dir: Path, disk_id: str, why: str) -> None:
    """The second copy is lost (its file removed or replaced): stop writing to it; the disk is degraded."""
    records = load(run_dir)
    rec = records.get(disk_id)
    if rec is None or rec.target is None:
        return
    records[disk_id] = Mirrored(  # recorded first: a status read meanwhile already says why and which copy
        disk_id=disk_id,
        source=rec.source,
        target=None,
        since=rec.since,
        error=why,
        failed=rec.target,
        source_ino=rec.source_ino,
        node=None,
        generation=rec.generation,
    )
    save(run_dir, records)
    await _end_job(execute, disk_id)
    await _drop_target(execute, rec)


async def watch(execute: Execute, run_dir: Path) -> list[str]:
    """One look at a VM's mirrored disks: act on a copy whose file vanished, or a disk paused on an I/O error.

    Returns what was done, one line each (for the log).
    """
    records = load(run_dir)
    if not records:
        return []
    done = []
    for d, rec in records.items():
        if rec.target is not None and rec.error is None and file_id(rec.target) != rec.target_ino:
            why = f"the second copy {rec.target} was removed or replaced"
            await give_up_target(execute, run_dir, d, why)
            done.append(f"disk {d}: {why}; running on {rec.source} alone")
        elif file_id(rec.source) != rec.source_ino and rec.source_ino is not None:
            why = f"the copy {rec.source} was removed or replaced"
            if await switch_over(execute, run_dir, d, why):
                done.append(f"disk {d}: {why}; switched to {rec.target}")
    done += await recover_io_errors(execute, run_dir)
    return done


async def recover_io_errors(execute: Execute, run_dir: Path) -> list[str]:
    """Disks paused on an I/O error of the copy they run on: switch each to its second copy, then resume.

    The VM is resumed only if every failed disk could switch: a disk with no good copy left keeps
    the VM paused (its data is safer so than with errors returned to the guest).
    """
    records = load(run_dir)
    failing = {d: s for d, s in (await _io_status(execute)).items() if s != "ok" and d in records}
    if not failing:
        return []
    done, stuck = [], []
    for d, st in failing.items():
        why = f"the copy {records[d].source} failed ({'no space left' if st == 'nospace' else 'I/O error'})"
        if await switch_over(execute, run_dir, d, why):
            done.append(f"disk {d}: {why}; switched to {records[d].target}")
        else:
            stuck.append(d)
    run_state = await execute("query-status")
    # QEMU sends BLOCK_IO_ERROR before it stops the VM (the stop is only requested): the status may
    # still read "running". A "cont" then cancels the pending stop (QEMU's blk_error_action says so);
    # waiting for "io-error" instead left the guest paused on its good copy.
    if not stuck and run_state.get("status") in ("io-error", "running"):
        await execute("cont")
    return done
