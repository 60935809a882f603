"""Synchronous disk replication ("network RAID-1") on QEMU 7.2: a second, always-in-sync copy of a disk on another host.

Design (both halves are small bounded steps, like live migration in
:mod:`kasou.hypervisor.qemu.migration`, whose helpers this reuses)::

    replica host (its agent, kasou.agent.replicas)       VM's host (QemuDriver)
    ----------------------------------------------       ----------------------
    qemu-img create -f qcow2 <vm>/<disk>.replica.qcow2
    qemu-storage-daemon --daemonize (own session):
      --blockdev file (locking=on) + qcow2
      --nbd-server HOST:PORT max-connections=1
      --export nbd writable, name kasou-<vm>-<disk>-<token>
                                                         attach_replica:
                                                           blockdev-add nbd (open-timeout 5 s, reconnect-delay 0)
                                                           blockdev-mirror sync=full copy-mode=write-blocking
                                                             on-target-error=report, job repl-<disk>
                                                           TCP_USER_TIMEOUT on QEMU's NBD socket
                                                           wait until the job is ready (in sync), bounded
                                                         (the mirror is never completed: it runs with the VM)
                                                         replica_status: query-block-jobs
                                                         detach_replica: block-job-cancel force, blockdev-del
    promote: the daemon stops; the file is a disk now

Why a mirror job, and not ``quorum`` or md/DRBD: this kernel has neither md
nor loadable modules, and QEMU's ``quorum`` cannot be given a new child that
starts out empty (it has no resync). A ``blockdev-mirror`` in
``write-blocking`` mode first copies the whole disk (``sync: full`` zeroes the
target first, so nothing stale survives in a reused file) and, once *ready*,
writes every guest write to the target before the guest sees it completed. The
job is simply never completed or cancelled while the VM runs.

What QEMU 7.2 does, read in its source and checked here (``mirror.c``, ``nbd.c``):

* **Flushes are not forwarded.** The mirror filter's ``bdrv_co_flush`` flushes
  only the source; the target sees no flush after the first copy (strace of the
  daemon: ``pwrite64`` for each guest write, no ``fdatasync``). So with the
  daemon's default cache (``cache.direct=off``: the page cache of the replica's
  host) an acknowledged write is *in the replica host's memory*: it survives
  a crash of the VM's host, of its QEMU or of the daemon (the kernel keeps the
  pages), but not a power loss of the replica host before the kernel writes
  it back (``dirty_expire``: 30 s by default). That covers the loss of any one
  host; the VM's own disk is flushed as usual. ``writethrough=True`` on the
  replica makes the export flush after every write (``fdatasync`` per write),
  so an acknowledged write is on the replica's disk: it also survives both
  hosts losing power at once with the VM's host never coming back; measured
  here it halves small synchronous writes again (4 KiB O_DIRECT: 0.29x of a
  local disk instead of 0.63x; bench/replication.py).
* **A failed target write never fails the guest.** The guest write goes to the
  source first, then to the target; a target error only marks the area dirty
  and, with ``on-target-error: report``, ends the job with the error
  (``concluded``, kept until dismissed: ``auto-dismiss: false``). From that
  moment QEMU itself stops writing to the target: nothing depends on this
  agent being alive. (``stop`` would pause the job but go on sending every
  guest write to the dead target.) Checked: SIGKILL of the daemon, the job
  ends with "Input/output error", the guest goes on writing.
* **A peer that does not answer hangs guest writes.** QEMU's NBD client has no
  I/O timeout. ``reconnect-delay: 0`` (the default) makes requests fail at once
  once the connection is *known* to be broken, but a host that lost power or a
  cut link sends no RST (TCP retries for about 15 minutes), and a daemon that is
  stuck (SIGSTOP here) still lets TCP acknowledge: the guest's write waits.
  Two guards: ``TCP_USER_TIMEOUT`` (10 s) set on QEMU's NBD socket (through
  ``pidfd_getfd``) makes the kernel drop a connection whose data stays
  unacknowledged, even with no agent running; and the driver's guard sees a job
  whose bytes in flight do not move for 5 s and shuts that socket down. Either
  way the target write fails, the job ends, the guest goes on (checked with
  SIGSTOP of the daemon).
* ``open-timeout`` bounds ``blockdev-add``: without it a connect to a server that
  never sends its greeting (one whose single client slot is taken) would block
  QEMU's monitor; with it the open gives up after 5 s.

Guarantees: the replica refuses a second writer (``max-connections=1`` and
QEMU's image lock on the file); one daemon per replica disk, found again after
an agent restart by its pid file and command line (``filename=<path>``).
Live migration keeps no mirror: the control plane detaches before migrating
and attaches a fresh replica afterwards. Between hosts with TLS files the daemon's
NBD server speaks TLS only (``--object tls-creds-x509`` endpoint server, verify-peer)
and the VM's QEMU connects with its client credentials and ``tls-hostname`` set to
the replica's address (:mod:`kasou.hypervisor.qemu.tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.errors import Conflict, HypervisorError, InvalidSpec, KasouError, MonitorError, OperationTimeout
from kasou.hypervisor.base import LaunchDisk, ReplicaExports, ReplicaStatus, validate_disk_id
from kasou.hypervisor.qemu import process, runfiles
from kasou.hypervisor.qemu import tls as qtls
from kasou.hypervisor.qemu.migration import PORT_ATTEMPTS, Execute, create_disk, free_port
from kasou.hypervisor.qemu.nbdsocket import cut_connections, set_user_timeout

log = logging.getLogger(__name__)

#: ``blockdev-add`` of the NBD client gives up connecting after this (below the QMP command timeout, 10 s).
OPEN_TIMEOUT_S = 5
#: Bytes in flight to the replica that do not move for this long: the replica hangs; its connection is cut.
STALL_S = 5.0
#: The kernel drops QEMU's NBD connection when sent data stays unacknowledged this long (no agent needed).
#: How often the driver's guard looks at the replicated VMs.
GUARD_PERIOD_S = 1.0
#: A cancelled job ends at once unless a write hangs on the replica; then its connection is cut.
CANCEL_S = 3.0
DETACH_S = 10.0
#: The daemon starts (and daemonizes) in well under a second.
QSD_START_S = 30.0
QSD_STOP_S = 10.0
RECORD = "replicas.json"  # in the VM's runtime directory


def job_id(disk_id: str) -> str:
    return f"repl-{disk_id}"


def nbd_node(disk_id: str) -> str:
    return f"repl-nbd-{disk_id}"


def _opt(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax (',' is doubled)."""
    return value.replace(",", ",,")


# -- the replica side: qemu-storage-daemon --------------------------------------------------


def qsd_argv(
    binary: str,
    path: Path,
    export: str,
    host: str,
    port: int,
    writethrough: bool,
    pidfile: Path,
    tls_dir: Path | None = None,
) -> list[str]:
    """The daemon serving one replica file: one writer at a time, the file locked, daemonized.

    With ``tls_dir`` (QEMU's credentials, :mod:`kasou.hypervisor.qemu.tls`) the NBD server speaks
    TLS only and refuses a client without a certificate of the site CA."""
    on = "on" if writethrough else "off"
    server = f"addr.type=inet,addr.host={host},addr.port={port},max-connections=1"
    tls: list[str] = []
    if tls_dir is not None:
        tls = ["--object", qtls.qsd_object(tls_dir)]
        server += f",tls-creds={qtls.SERVER_ID}"
    return [
        binary,
        *tls,
        "--blockdev", f"driver=file,node-name=file,filename={_opt(str(path))},locking=on,discard=unmap",
        "--blockdev", "driver=qcow2,node-name=replica,file=file,discard=unmap",
        "--nbd-server", server,
        "--export", f"type=nbd,id=replica,node-name=replica,name={_opt(export)},writable=on,writethrough={on}",
        "--pidfile", str(pidfile),
        "--daemonize",
    ]  # fmt: skip


class _PortTaken(HypervisorError):
    pass


class QsdExports(ReplicaExports):
    """Replica files served by ``qemu-storage-daemon``, one daemon per file, each in its own session."""

    def __init__(self, binary: str = "qemu-storage-daemon", tls_dir: Path | None = None) -> None:
        self.binary = binary
        self.tls_dir = tls_dir  # QEMU's credentials: the exports are TLS only

    async def create(self, path: Path, size_bytes: int) -> None:
        await create_disk(path, "qcow2", size_bytes)

    @staticmethod
    def pidfile(path: Path) -> Path:
        return path.with_suffix(".pid")

    def _pid(self, path: Path) -> int | None:
        """The pid of the daemon serving ``path``, if it runs (checked on its command line: pids are reused)."""
        try:
            pid = int(self.pidfile(path).read_text().strip())
        except (OSError, ValueError):
            return None
        if not process.alive(pid):
            return None
        args = process.cmdline(pid)
        mark = f"filename={_opt(str(path))},"
        if not args or "qemu-storage-daemon" not in Path(args[0]).name or not any(mark in a for a in args):
            return None
        return pid

    def alive(self, path: Path) -> bool:
        return self._pid(path) is not None

    async def start(self, path: Path, export: str, listen_host: str, writethrough: bool) -> int:
        if self.alive(path):
            raise Conflict(f"a replica daemon already serves {path}")
        last: HypervisorError | None = None
        for _ in range(PORT_ATTEMPTS):
            port = free_port(listen_host)
            try:
                await self._spawn(qsd_argv(self.binary, path, export, listen_host, port, writethrough,
                                           self.pidfile(path), self.tls_dir), path)  # fmt: skip
                return port
            except _PortTaken as e:  # someone took the port between our choice and the daemon's bind
                last = e
        assert last is not None
        raise HypervisorError(last.message)

    async def _spawn(self, argv: list[str], path: Path) -> None:
        self.pidfile(path).unlink(missing_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise HypervisorError(f"{argv[0]} is not installed on this host") from None
        try:
            _, err = await asyncio.wait_for(proc.communicate(), QSD_START_S)
        except BaseException:  # a timeout, or the caller gave up: leave no daemon behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            await self.stop(path)
            raise
        if proc.returncode != 0:
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            why = why.split(": ", 1)[1] if why.startswith(argv[0]) and ": " in why else why
            cls = _PortTaken if "Address already in use" in why else HypervisorError
            raise cls(f"qemu-storage-daemon refused to serve {path}: {why}")
        if not self.alive(path):
            raise HypervisorError(f"qemu-storage-daemon for {path} exited right after starting")

    async def stop(self, path: Path) -> None:
        pid = self._pid(path)
        if pid is not None and not await process.kill_hard(pid, QSD_STOP_S):  # SIGTERM: it closes the image cleanly
            raise HypervisorError(f"the replica daemon of {path} (pid {pid}) will not end")
        self.pidfile(path).unlink(missing_ok=True)


# -- the VM's side: what is attached (saved in the VM's runtime directory) ------------------


@dataclass
class Attached:
    """One disk's replica as this host attached it."""

    disk_id: str
    nbd_host: str
    nbd_port: int
    export: str
    since: float  # epoch seconds
    error: str | None = None  # why the guard gave up on it


def load(run_dir: Path) -> dict[str, Attached]:
    try:
        data = json.loads((run_dir / RECORD).read_text())
        return {d: Attached(**rec) for d, rec in data.items()}
    except (OSError, ValueError, TypeError):
        return {}


def save(run_dir: Path, records: dict[str, Attached]) -> None:
    runfiles.save_records(run_dir / RECORD, records)


# -- pure helpers -------------------------------------------------------------------------


def _job(jobs: Iterable[dict[str, Any]], disk_id: str) -> dict[str, Any] | None:
    return next((j for j in jobs if j.get("device") == job_id(disk_id)), None)


def job_failure(job: dict[str, Any] | None) -> str | None:
    """Why a replication job no longer keeps the replica in sync, or None while it does (or still copies)."""
    if job is None:
        return "the replication job ended"
    if job.get("error"):
        return f"a write to the replica failed: {job['error']}"
    status = job.get("status")
    if status in ("concluded", "aborting", "null", "undefined", "pending", "waiting"):
        return "the replication job ended"
    if job.get("io-status", "ok") != "ok":
        return f"the replica's I/O status is {job['io-status']}"
    if status in ("paused", "standby"):
        return "the replication job is paused"
    return None


def disk_status(disk_id: str, record: Attached | None, job: dict[str, Any] | None) -> ReplicaStatus:
    if record is None:
        return ReplicaStatus(disk_id=disk_id, state="none")
    out = ReplicaStatus(
        disk_id=disk_id,
        state="syncing",
        nbd_host=record.nbd_host,
        nbd_port=record.nbd_port,
        export=record.export,
        since=record.since,
    )
    why = record.error or job_failure(job)
    if why is not None:
        return out.model_copy(update={"state": "degraded", "error": why})
    assert job is not None
    if job.get("ready"):
        return out.model_copy(update={"state": "in_sync", "progress": 1.0})
    total, done = int(job.get("len", 0)), int(job.get("offset", 0))
    return out.model_copy(update={"progress": round(min(max(done / total, 0.0), 1.0), 4) if total > 0 else 0.0})


def statuses(disks: Sequence[str], records: dict[str, Attached], jobs: Sequence[dict[str, Any]]) -> list[ReplicaStatus]:
    """Every disk's replication (the launch spec's disks, then any other attached one)."""
    ids = list(disks) + sorted(d for d in records if d not in disks)
    return [disk_status(d, records.get(d), _job(jobs, d)) for d in ids]


class StallWatch:
    """Notices jobs whose bytes in flight to the replica do not move (a replica that hangs)."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}  # (vm, disk) -> (offset, since when)

    def stalled(self, vm: str, disk_id: str, job: dict[str, Any] | None, now: float) -> bool:
        key = (vm, disk_id)
        if job is None or job_failure(job) is not None or int(job.get("len", 0)) <= int(job.get("offset", 0)):
            self._seen.pop(key, None)  # nothing in flight (or nothing to watch any more)
            return False
        offset = int(job.get("offset", 0))
        seen = self._seen.get(key)
        if seen is None or seen[0] != offset:
            self._seen[key] = (offset, now)
            return False
        return now - seen[1] >= self.stall_s

    def forget(self, vm: str, disk_id: str | None = None) -> None:
        for key in [k for k in self._seen if k[0] == vm and disk_id in (None, k[1])]:
            del self._seen[key]


# -- QMP steps on the VM's host --------------------------------------------------------------


async def node_sizes(execute: Execute, names: Sequence[str]) -> dict[str, int]:
    nodes = await execute("query-named-block-nodes", {"flat": True})
    named = (n for n in nodes if n.get("node-name") in names)
    return {n["node-name"]: int(n.get("image", {}).get("virtual-size", -1)) for n in named}


async def attach(
    execute: Execute,
    pid: int,
    run_dir: Path,
    disks: Sequence[LaunchDisk],
    disk_id: str,
    nbd_host: str,
    nbd_port: int,
    export: str,
    tls_dir: Path | None = None,
) -> bool:
    """Connect to the replica and start mirroring into it; False if that very target is attached already.

    With ``tls_dir`` (this host's QEMU credentials) the connection is TLS and the replica's
    certificate must name ``nbd_host``.

    Refused for an unknown or read-only disk, one with another replica, or a
    replica of another size. On failure nothing is left in QEMU or the record.
    """
    validate_disk_id(disk_id)
    disk = next((d for d in disks if d.id == disk_id), None)
    if disk is None:
        raise InvalidSpec(f"the VM has no disk {disk_id!r}", field="disk_id")
    if disk.readonly:
        raise InvalidSpec(f"disk {disk_id} is read-only; there is nothing to replicate", field="disk_id")
    records = load(run_dir)
    current = records.get(disk_id)
    if current is not None:
        if (current.nbd_host, current.nbd_port, current.export) == (nbd_host, nbd_port, export) and not current.error:
            return False
        raise Conflict(
            f"disk {disk_id} already has a replica at {current.nbd_host}:{current.nbd_port}; detach it first"
        )
    if _job(await execute("query-block-jobs", None), disk_id) is not None:
        raise Conflict(f"disk {disk_id} has a replication job already; detach it first")
    node = nbd_node(disk_id)
    server = {"type": "inet", "host": nbd_host, "port": str(nbd_port)}
    args: dict[str, Any] = {"driver": "nbd", "node-name": node, "server": server, "export": export,
                            "open-timeout": OPEN_TIMEOUT_S, "reconnect-delay": 0}  # fmt: skip
    try:
        if tls_dir is not None:
            args["tls-creds"] = await qtls.ensure_creds(execute, "client", tls_dir)
            args["tls-hostname"] = nbd_host
        await execute("blockdev-add", args)
    except MonitorError as e:
        raise HypervisorError(f"cannot reach the replica of disk {disk_id} at {nbd_host}:{nbd_port}: {e}") from None
    started = False
    try:
        # sync full zeroes the target first: a reused file keeps nothing stale
        await start_blocking_mirror(
            execute, job_id(disk_id), disk_id, disk_id, node, "full", "the replica", "size_bytes"
        )
        started = True
        records[disk_id] = Attached(disk_id, nbd_host, nbd_port, export, time.time())
        save(run_dir, records)
    except BaseException:
        if started:
            with contextlib.suppress(KasouError):
                await _end_job(execute, pid, disk_id, None)
        with contextlib.suppress(KasouError):
            await execute("blockdev-del", {"node-name": node})
        raise
    if await asyncio.to_thread(set_user_timeout, pid, nbd_host, nbd_port) == 0:
        log.warning("no NBD connection of QEMU pid %d to %s:%d found to bound", pid, nbd_host, nbd_port)
    return True


async def start_blocking_mirror(
    execute: Execute, job: str, disk_id: str, source: str, target: str, sync: str, what: str, field: str
) -> None:
    """Start disk ``disk_id``'s write-blocking mirror job ``job`` from node ``source`` to node ``target``
    (mirrored disks and replicas alike), once both have the same size. Once the job is ready, a
    guest write completes only when ``target`` has it too; a failed target ends the job, and the
    guest never sees it; the ended job stays visible (degraded, with its error) until detached."""
    sizes = await node_sizes(execute, [source, target])
    if sizes.get(source) != sizes.get(target):
        raise InvalidSpec(
            f"{what} holds {sizes.get(target)} bytes but disk {disk_id} has {sizes.get(source)}", field=field
        )
    await execute("blockdev-mirror", {
        "job-id": job,
        "device": source,
        "target": target,
        "sync": sync,
        "copy-mode": "write-blocking",
        "on-source-error": "report",
        "on-target-error": "report",
        "auto-dismiss": False,
    })  # fmt: skip


async def wait_in_sync(
    execute: Execute, disk_id: str, timeout_s: float, stall_s: float = 60.0, poll_s: float = 0.1
) -> None:
    """Wait until the first full copy is done (the job is ready); bounded by ``timeout_s`` and a stall timeout."""
    loop = asyncio.get_running_loop()
    t0 = last_move = loop.time()
    best = -1
    while True:
        job = _job(await execute("query-block-jobs", None), disk_id)
        why = job_failure(job)
        if why is not None:
            raise HypervisorError(f"copying disk {disk_id} to its replica failed: {why}")
        assert job is not None
        if job.get("ready"):
            return
        done, total = int(job.get("offset", 0)), int(job.get("len", 0))
        now = loop.time()
        if done > best:
            best, last_move = done, now
        pct = f"{100 * done / total:.0f} % copied" if total else "nothing copied"
        if now - last_move > stall_s:
            raise OperationTimeout(f"copying disk {disk_id} to its replica made no progress for {stall_s:.0f} s")
        if now - t0 > timeout_s:
            raise OperationTimeout(f"disk {disk_id} was not in sync with its replica within {timeout_s:g} s ({pct})")
        await asyncio.sleep(poll_s)


async def _end_job(execute: Execute, pid: int, disk_id: str, record: Attached | None) -> None:
    """Cancel the job (force: the replica's content does not matter any more) and dismiss it, bounded.

    A job with a write hanging on the replica cannot end: its connection is cut after CANCEL_S. QEMU drains the
    job's requests inside the cancel command itself, so a replica that does not answer holds the monitor there:
    the cut is made beside the pending command (from the host, on QEMU's sockets), which then returns.
    """

    async def cancel() -> None:
        with contextlib.suppress(MonitorError):  # concluded already, or never started
            await execute("block-job-cancel", {"device": job_id(disk_id), "force": True})

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    cut = False
    pending = asyncio.ensure_future(cancel())
    done, _ = await asyncio.wait({pending}, timeout=CANCEL_S)
    if not done and record is not None:
        cut = True
        await asyncio.to_thread(cut_connections, pid, record.nbd_host, record.nbd_port)
    await pending  # bounded by the command's own QMP timeout
    while True:
        job = _job(await execute("query-block-jobs", None), disk_id)
        if job is None or job.get("status") == "concluded":
            break
        if not cut and record is not None and loop.time() - t0 > CANCEL_S:
            cut = True
            await asyncio.to_thread(cut_connections, pid, record.nbd_host, record.nbd_port)
        if loop.time() - t0 > DETACH_S:
            raise OperationTimeout(f"the replication of disk {disk_id} did not stop within {DETACH_S:.0f} s")
        await asyncio.sleep(0.05)
    if job is not None:
        with contextlib.suppress(MonitorError):
            await execute("job-dismiss", {"id": job_id(disk_id)})


async def detach(execute: Execute, pid: int, run_dir: Path, disk_id: str) -> None:
    """End the replication of one disk and drop its NBD client; nothing happens if none is attached."""
    records = load(run_dir)
    record = records.get(disk_id)
    await _end_job(execute, pid, disk_id, record)
    node = nbd_node(disk_id)
    if node in await node_sizes(execute, [node]):
        await execute("blockdev-del", {"node-name": node})
    if records.pop(disk_id, None) is not None:
        save(run_dir, records)


async def status(execute: Execute, run_dir: Path, disks: Sequence[str]) -> list[ReplicaStatus]:
    records = load(run_dir)
    jobs = await execute("query-block-jobs", None) if records else []
    return statuses(disks, records, jobs)


async def guard(execute: Execute, vm: str, pid: int, run_dir: Path, watch: StallWatch) -> list[str]:
    """One look at a VM's replicas: cut the connection of any that hangs. Returns the disks given up."""
    records = load(run_dir)
    if not records:
        watch.forget(vm)
        return []
    jobs = await execute("query-block-jobs", None)
    now = time.monotonic()
    cut = []
    for d, rec in records.items():
        if rec.error is None and watch.stalled(vm, d, _job(jobs, d), now):
            rec.error = (
                f"the replica at {rec.nbd_host}:{rec.nbd_port} did not answer for {watch.stall_s:.0f} s; "
                "its connection was cut and the guest writes to its local disk only"
            )
            # Recorded before the cut: a status read meanwhile would otherwise report only the
            # failed job's "Input/output error", not why the connection went.
            save(run_dir, records)
            n = await asyncio.to_thread(cut_connections, pid, rec.nbd_host, rec.nbd_port)
            log.error("VM %s disk %s: %s (%d connection(s) cut)", vm, d, rec.error, n)
            watch.forget(vm, d)
            cut.append(d)
    return cut
