"""Live migration on QEMU 7.2 over QMP: pure helpers, the saved state of a migration and its QMP steps.

The QEMU driver strings these together (Ganeti-style small steps that the
control plane orchestrates)::

    destination                                 source
    -----------                                 ------
    prepare_incoming: [copy: qemu-img create each disk]
      qemu ... -incoming defer -S
      migrate-set-capabilities late-block-activate
      [tls: object-add tls-creds-x509 endpoint=server, migrate-set-parameters tls-creds]
      [copy: nbd-server-start (tls-creds), block-export-add per disk (writable)]
      migrate-incoming tcp:HOST:PORT
                                                migrate_out:
                                                  migrate-set-capabilities auto-converge
                                                  [tls: object-add tls-creds-x509 endpoint=client]
                                                  migrate-set-parameters downtime-limit, max-bandwidth
                                                    [tls: tls-creds, tls-hostname = HOST]
                                                  [copy: blockdev-add nbd client, blockdev-mirror
                                                   sync=full copy-mode=write-blocking, wait ready]
                                                  migrate tcp:HOST:PORT
                                                migration_status: query-migrate (+ query-block-jobs);
                                                  at "completed", [copy: block-job-cancel each ready
                                                  mirror: its final sync] before saying so
    finish_incoming: [nbd-server-stop], cont
                                                finish_out: quit (exit "migrated"), forget

The mirrors run in ``write-blocking`` mode: once ready, every guest write is on
the destination before the guest sees it acknowledged, so the copy is exact at
the moment the source stops. ``late-block-activate`` keeps the destination off
the images (and their locks) until ``cont``.

Between hosts with TLS files both streams are TLS with certificates of the site CA checked
on both ends (:mod:`kasou.hypervisor.qemu.tls`); ``IncomingInfo.tls`` tells the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kasou.errors import HypervisorError, InvalidSpec, KasouError, MonitorError, OperationTimeout
from kasou.hypervisor.base import IncomingInfo, MigrationStatus

MiB = 1024 * 1024

#: A mirror whose copied bytes do not grow for this long has stalled (the network, or the destination).
MIRROR_STALL_S = 60.0
#: The hard bound on copying disks before the memory (a huge disk on a slow link).
MIRROR_MAX_S = 24 * 3600.0
#: The final sync of ready mirrors after the switch-over (nothing is dirty in write-blocking mode).
MIRROR_FINISH_S = 30.0
#: How long the destination may take to load the last of the state once the source says completed.
INCOMING_SETTLE_S = 30.0
#: QEMU's cap on migration bandwidth when the caller sets none (QEMU's own default is 128 MiB/s).
DEFAULT_BANDWIDTH_MIB_S = 1024
#: ``migrate_cancel`` takes effect within a few hundred ms.
CANCEL_S = 10.0
#: Attempts at a free port (another process may take the one chosen before QEMU binds it).
PORT_ATTEMPTS = 5
QEMU_IMG_TIMEOUT = 120.0

TERMINAL = frozenset({"completed", "failed", "cancelled"})


class Execute(Protocol):
    """Runs one QMP command on one VM's QEMU (bounded), as the driver's monitor does."""

    def __call__(self, command: str, arguments: dict[str, Any] | None = None, /) -> Awaitable[Any]: ...


# -- pure helpers -------------------------------------------------------------------------


def is_terminal(status: str) -> bool:
    """True for a migration status that will not change any more."""
    return status in TERMINAL


def is_active(status: str) -> bool:
    """True while QEMU migrates (``setup``, ``active``, ``device``, ``cancelling``, postcopy, ...)."""
    return status not in TERMINAL and status not in ("none", "")


def nbd_node(disk_id: str) -> str:
    """Node name of the source's NBD client of one destination disk."""
    return f"mig-{disk_id}"


def mirror_job(disk_id: str) -> str:
    return f"mirror-{disk_id}"


def export_id(disk_id: str) -> str:
    return f"exp-{disk_id}"


def host_for_uri(host: str) -> str:
    """An IPv6 literal goes in brackets in ``tcp:`` URIs."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host  # a host name


def tcp_uri(host: str, port: int) -> str:
    return f"tcp:{host_for_uri(host)}:{port}"


def free_port(host: str) -> int:
    """A TCP port nobody listens on at ``host`` right now (the kernel's choice)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(addr)
            return int(s.getsockname()[1])
    except (OSError, IndexError) as e:
        raise InvalidSpec(f"cannot listen for a migration on {host!r}: {e}", field="listen_host") from None


def mirror_progress(jobs: Iterable[dict[str, Any]], disk_ids: Sequence[str]) -> tuple[int, int]:
    """(bytes copied, bytes to copy) over the mirror jobs of ``disk_ids``."""
    wanted = {mirror_job(d) for d in disk_ids}
    done = total = 0
    for j in jobs:
        if j.get("device") in wanted:
            done += int(j.get("offset", 0))
            total += int(j.get("len", 0))
    return done, total


def mirror_failure(jobs: Iterable[dict[str, Any]], disk_ids: Sequence[str]) -> str | None:
    """Why the disk copies cannot be trusted any more, or None while they are all well."""
    by_id = {j.get("device"): j for j in jobs}
    for d in disk_ids:
        j = by_id.get(mirror_job(d))
        if j is None:
            return f"the copy of disk {d} ended unexpectedly"
        if j.get("error"):
            return f"copying disk {d} failed: {j['error']}"
        if j.get("status") == "concluded":
            return f"the copy of disk {d} ended before the migration did"
        if j.get("io-status", "ok") != "ok":
            return f"copying disk {d} failed: I/O status {j['io-status']}"
    return None


def status_from(
    query: dict[str, Any],
    *,
    phase: str | None = None,
    mirror_jobs: Sequence[dict[str, Any]] = (),
    disk_ids: Sequence[str] = (),
    ram_bytes: int = 0,
    mirror_ms: int | None = None,
    error: str | None = None,
) -> MigrationStatus:
    """A :class:`MigrationStatus` from QEMU's ``query-migrate`` and the mirror jobs.

    ``phase`` is the driver's: ``mirroring`` (the disks are being copied and QEMU
    has not started on memory), ``migrating`` or ``failed``. ``ram_bytes`` sizes
    the memory before QEMU reports its own total; ``mirror_ms`` is how long the
    disk copy took (or has taken so far), added to QEMU's total time.
    """
    status = str(query.get("status") or "none")
    if phase == "mirroring":
        status = "mirroring"
    if phase == "failed" or error:
        status = "failed"
    disk_done, disk_total = mirror_progress(mirror_jobs, disk_ids)
    ram = query.get("ram") if phase != "mirroring" else None
    ram_total, ram_done = ram_bytes, 0
    if isinstance(ram, dict) and ram.get("total"):
        ram_total = int(ram["total"])
        ram_done = ram_total - int(ram.get("remaining", ram_total))
    ram_done = min(max(ram_done, 0), ram_total)
    if status == "completed":
        progress = 1.0
    elif disk_total + ram_total > 0:
        progress = (disk_done + ram_done) / (disk_total + ram_total)
    else:
        progress = 0.0
    total_ms = query.get("total-time") if phase != "mirroring" else None
    if mirror_ms is not None:
        total_ms = mirror_ms + int(total_ms or 0)
    return MigrationStatus(
        status=status,
        progress=round(min(max(progress, 0.0), 1.0), 4),
        downtime_ms=_int(query.get("downtime")) if status == "completed" else None,
        total_ms=_int(total_ms),
        setup_ms=_int(query.get("setup-time")) if phase != "mirroring" else None,
        error=error or (str(query["error-desc"]) if query.get("error-desc") else None),
    )


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


# -- what a host remembers of a migration (saved in the VM's runtime directory) ------------


@dataclass
class Outgoing:
    """The source side of one migration."""

    incoming: IncomingInfo
    disks: list[str]  # ids of the disks mirrored (copy storage); empty for shared storage
    was_running: bool  # the guest ran when the migration began (resumed again by an abort)
    ram_bytes: int = 0  # the guest's memory, to weigh progress before QEMU reports its own total
    started: float = field(default_factory=time.time)  # epoch seconds
    phase: str = "migrating"  # "mirroring" | "migrating" | "failed"
    mirror_ms: int | None = None  # how long the disk copy took before the memory went
    error: str | None = None
    reported_completed: bool = False  # "completed" was said: the destination may run the guest now
    task: asyncio.Task[None] | None = None  # mirroring, then migrate (not saved)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": "out",
            "incoming": self.incoming.model_dump(),
            "disks": self.disks,
            "was_running": self.was_running,
            "ram_bytes": self.ram_bytes,
            "started": self.started,
            "phase": self.phase,
            "mirror_ms": self.mirror_ms,
            "error": self.error,
            "reported_completed": self.reported_completed,
        }


@dataclass
class Incoming:
    """The destination side of one migration."""

    info: IncomingInfo
    created: list[str]  # disk files made here for it (copy storage), removed by an abort

    def to_json(self) -> dict[str, Any]:
        return {"role": "in", "info": self.info.model_dump(), "created": self.created}


def save(path: Path, state: Outgoing | Incoming | None) -> None:
    """Write (or, for None, remove) the migration record, atomically."""
    if state is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json()))
    tmp.replace(path)


def load(path: Path) -> Outgoing | Incoming | None:
    try:
        data = json.loads(path.read_text())
        if data.get("role") == "in":
            return Incoming(IncomingInfo.model_validate(data["info"]), list(data.get("created", [])))
        if data.get("role") == "out":
            return Outgoing(
                incoming=IncomingInfo.model_validate(data["incoming"]),
                disks=list(data.get("disks", [])),
                was_running=bool(data.get("was_running", True)),
                ram_bytes=int(data.get("ram_bytes", 0)),
                started=float(data.get("started", time.time())),
                phase=str(data.get("phase", "migrating")),
                mirror_ms=data.get("mirror_ms"),
                error=data.get("error"),
                reported_completed=bool(data.get("reported_completed", False)),
            )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return None


# -- QMP steps ------------------------------------------------------------------------------


async def create_disk(path: Path, fmt: str, size_bytes: int) -> None:
    """An empty image of ``size_bytes`` for a disk copied in from the source."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", fmt, str(path), str(size_bytes),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationTimeout(f"qemu-img create {path} took over {QEMU_IMG_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        why = lines[-1].removeprefix("qemu-img: ") if lines else f"exit status {proc.returncode}"
        raise HypervisorError(f"cannot make disk {path}: {why}")


async def _on_free_port(host: str, command: Callable[[int], Awaitable[Any]]) -> int:
    """Run ``command(port)`` on a free port, choosing again if someone took it meanwhile."""
    last: MonitorError | None = None
    for _ in range(PORT_ATTEMPTS):
        port = free_port(host)
        try:
            await command(port)
            return port
        except MonitorError as e:
            last = e
    assert last is not None
    raise last


async def start_nbd_server(execute: Execute, host: str, tls_creds: str | None = None) -> int:
    """``nbd-server-start`` on a free port of ``host`` (over TLS with ``tls_creds``); returns the port."""

    async def start(port: int) -> None:
        addr = {"type": "inet", "data": {"host": host, "port": str(port)}}
        args: dict[str, Any] = {"addr": addr}
        if tls_creds:
            args["tls-creds"] = tls_creds  # a client without TLS and a certificate of the site CA is refused
        await execute("nbd-server-start", args)

    return await _on_free_port(host, start)


async def export_disks(execute: Execute, disk_ids: Sequence[str]) -> dict[str, str]:
    """Export each disk node writable over NBD under its own id; returns id -> export name."""
    for d in disk_ids:
        args = {"type": "nbd", "id": export_id(d), "node-name": d, "name": d, "writable": True}
        await execute("block-export-add", args)
    return {d: d for d in disk_ids}


async def start_incoming(execute: Execute, host: str, tls_creds: str | None = None) -> str:
    """``migrate-incoming`` on a free port of ``host`` (over TLS with ``tls_creds``); returns the URI for the source."""
    await execute("migrate-set-capabilities", {"capabilities": [{"capability": "late-block-activate", "state": True}]})
    if tls_creds:
        await execute("migrate-set-parameters", {"tls-creds": tls_creds})
    uris: list[str] = []

    async def listen(port: int) -> None:
        uris.append(tcp_uri(host, port))
        await execute("migrate-incoming", {"uri": uris[-1]})

    await _on_free_port(host, listen)
    return uris[-1]


async def set_parameters(
    execute: Execute,
    downtime_ms: int,
    auto_converge: bool,
    bandwidth_mib_s: int | None,
    tls_creds: str | None = None,
    tls_hostname: str | None = None,
) -> None:
    """Set every tunable explicitly: a QEMU keeps them from an earlier (aborted) attempt.

    With ``tls_creds`` the stream goes over TLS and the destination's certificate must name
    ``tls_hostname`` (its address in the migration URI)."""
    caps = [{"capability": "auto-converge", "state": auto_converge}]
    await execute("migrate-set-capabilities", {"capabilities": caps})
    bandwidth = (bandwidth_mib_s or DEFAULT_BANDWIDTH_MIB_S) * MiB
    params: dict[str, Any] = {"downtime-limit": downtime_ms, "max-bandwidth": bandwidth}
    if tls_creds:
        params["tls-creds"] = tls_creds
        params["tls-hostname"] = tls_hostname or ""
    await execute("migrate-set-parameters", params)


async def start_mirrors(
    execute: Execute,
    incoming: IncomingInfo,
    disk_ids: Sequence[str],
    bandwidth_mib_s: int | None,
    tls_creds: str | None = None,
) -> None:
    """Connect to each destination export (over TLS with ``tls_creds``) and mirror into it; on failure undo all."""
    added: list[str] = []
    started: list[str] = []
    try:
        for d in disk_ids:
            export = incoming.exports.get(d)
            if export is None:
                raise InvalidSpec(f"the destination exports no disk {d!r}", field="incoming")
            server = {"type": "inet", "host": incoming.nbd_host, "port": str(incoming.nbd_port)}
            node: dict[str, Any] = {"driver": "nbd", "node-name": nbd_node(d), "server": server, "export": export}
            if tls_creds:
                node["tls-creds"], node["tls-hostname"] = tls_creds, incoming.nbd_host
            await execute("blockdev-add", node)
            added.append(d)
            args: dict[str, Any] = {
                "job-id": mirror_job(d),
                "device": d,
                "target": nbd_node(d),
                "sync": "full",
                "copy-mode": "write-blocking",
                "auto-dismiss": False,  # a failed job stays visible until we dismiss it
            }
            if bandwidth_mib_s:
                args["speed"] = bandwidth_mib_s * MiB
            await execute("blockdev-mirror", args)
            started.append(d)
    except BaseException:
        with contextlib.suppress(KasouError):
            await finish_mirrors(execute, started, force=True, timeout=MIRROR_FINISH_S)
        await remove_nbd_nodes(execute, added)
        raise


async def wait_mirrors_ready(
    execute: Execute,
    disk_ids: Sequence[str],
    stall_s: float = MIRROR_STALL_S,
    max_s: float = MIRROR_MAX_S,
    poll_s: float = 0.2,
) -> None:
    """Wait until every mirror is ready (in sync); bounded by a stall timeout and a hard one."""
    loop = asyncio.get_running_loop()
    t0 = last_move = loop.time()
    best = -1
    while True:
        jobs = await execute("query-block-jobs", None)
        why = mirror_failure(jobs, disk_ids)
        if why is not None:
            raise HypervisorError(why)
        wanted = {mirror_job(d) for d in disk_ids}
        if all(j.get("ready") for j in jobs if j.get("device") in wanted):
            return
        done, _ = mirror_progress(jobs, disk_ids)
        now = loop.time()
        if done > best:
            best, last_move = done, now
        if now - last_move > stall_s:
            raise OperationTimeout(f"copying the disks made no progress for {stall_s:.0f} s")
        if now - t0 > max_s:
            raise OperationTimeout(f"copying the disks took over {max_s:.0f} s")
        await asyncio.sleep(poll_s)


async def finish_mirrors(
    execute: Execute, disk_ids: Sequence[str], force: bool, timeout: float = MIRROR_FINISH_S
) -> None:
    """End the mirror jobs and dismiss them.

    Without ``force``, cancelling a ready mirror completes it: it copies what is
    still dirty and leaves the destination a consistent copy; a failure is raised.
    With ``force`` the jobs are dropped at once and errors are ignored (an abort).
    """
    if not disk_ids:
        return
    wanted = {mirror_job(d) for d in disk_ids}
    for job in sorted(wanted):
        with contextlib.suppress(MonitorError):  # already concluded, or never started
            await execute("block-job-cancel", {"device": job, "force": force})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    errors: list[str] = []
    while True:
        jobs = [j for j in await execute("query-block-jobs", None) if j.get("device") in wanted]
        pending = [j for j in jobs if j.get("status") != "concluded"]
        if not pending:
            break
        if loop.time() > deadline:
            raise OperationTimeout(f"the disk copies did not end within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    for j in jobs:
        if j.get("error"):
            errors.append(f"{j['device']}: {j['error']}")
        with contextlib.suppress(MonitorError):
            await execute("job-dismiss", {"id": j["device"]})
    if errors and not force:
        raise HypervisorError("the final sync of the disk copies failed: " + "; ".join(errors))


async def remove_nbd_nodes(execute: Execute, disk_ids: Sequence[str]) -> None:
    for d in disk_ids:
        with contextlib.suppress(MonitorError):  # never added, or already gone
            await execute("blockdev-del", {"node-name": nbd_node(d)})


async def cancel_migration(execute: Execute, timeout: float = CANCEL_S) -> None:
    """``migrate_cancel`` if a migration is under way, and wait until it has stopped."""
    q = await execute("query-migrate", None)
    if not is_active(str(q.get("status", "none"))):
        return
    await execute("migrate_cancel", None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while is_active(str((await execute("query-migrate", None)).get("status", "none"))):
        if loop.time() > deadline:
            raise OperationTimeout(f"the migration did not stop within {timeout:.0f} s of migrate_cancel")
        await asyncio.sleep(0.05)


async def wait_incoming_done(execute: Execute, timeout: float = INCOMING_SETTLE_S) -> None:
    """On the destination: wait until all the state has arrived and loaded (QEMU left ``inmigrate``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        q = await execute("query-migrate", None)
        status = str(q.get("status", "none"))
        run = str((await execute("query-status", None)).get("status", ""))
        if status == "completed" and run != "inmigrate":
            return
        if status in ("failed", "cancelled"):
            raise HypervisorError(f"the incoming migration {status}: {q.get('error-desc') or 'no detail'}")
        if loop.time() > deadline:
            raise OperationTimeout(f"the incoming migration is not complete here (status {status}, run state {run})")
        await asyncio.sleep(0.05)
