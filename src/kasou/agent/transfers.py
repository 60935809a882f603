"""Imports and exports on one host: long ``qemu-img`` runs the control plane follows by polling.

``POST /agent/v1/transfers/inspect`` answers at once (:mod:`kasou.agent.sources`). An import of one
disk (``.../imports``) or an export of a VM into an OVA (``.../exports``) starts a task and answers with
its status; ``GET .../transfers/{id}`` tells its progress (qemu-img's own ``-p``), ``DELETE`` cancels it
and forgets it. A task that fails or is cancelled removes every file it made; so does deleting the
disk it is making (``POST /agent/v1/disks/delete``), and so does the agent's own shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query

from kasou.agent import ova, v2v
from kasou.agent.models import DiskImport, ExportCreate, GuestConvert, TransferStatus
from kasou.agent.sources import Sources, convert_source
from kasou.agent.storage import LocalDisks
from kasou.errors import ImageError, InvalidSpec, KasouError, NotFound, OperationTimeout
from kasou.hypervisor import imagefiles
from kasou.hypervisor.qemu.process import die_with_parent
from kasou.model.imports import ImportInspect, ImportSource
from kasou.model.ovf_write import ExportDisk, write_ovf

log = logging.getLogger(__name__)

STALL_S = 1800.0  # qemu-img reports every 1 %: a run silent this long is stuck (a dead NFS mount, say)
KEEP_DONE_S = 3600.0  # a finished task nobody collected is forgotten after this
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


async def run_with_progress(argv: list[str], progress: Callable[[float], Awaitable[None]]) -> None:
    """Run ``qemu-img ... -p`` and pass on its progress (0..1); its last error line becomes an ImageError."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,  # qemu-img ends if the agent dies
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(proc.stdout.read(4096), STALL_S)
            except TimeoutError:
                raise OperationTimeout(f"qemu-img made no progress for {STALL_S:.0f} s") from None
            if not chunk:
                break
            found = _PROGRESS.findall(chunk)
            if found:
                await progress(min(1.0, float(found[-1]) / 100))
        err = await asyncio.wait_for(proc.stderr.read(), 30)
        code = await asyncio.wait_for(proc.wait(), 30)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 10)
        raise
    if code != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        raise ImageError((lines[-1] if lines else f"exit status {code}").removeprefix("qemu-img: "))


class Task:
    def __init__(self, status: TransferStatus) -> None:
        self.status = status
        self.task: asyncio.Task[None] | None = None
        self.finished_at: float | None = None

    async def progress(self, fraction: float, step: str | None = None) -> None:
        self.status.progress = max(self.status.progress, min(1.0, fraction))
        if step is not None:
            self.status.step = step


class Transfers:
    """The import and export tasks of one host."""

    def __init__(self, sources: Sources, disks: LocalDisks, accelerator: str = "tcg") -> None:
        self.sources = sources
        self.disks = disks
        self.accelerator = accelerator  # what the agent's probe decided: virt-v2v's appliance runs under the same
        self._tasks: dict[str, Task] = {}

    async def inspect(self, req: ImportInspect) -> ImportSource:
        found = await self.sources.inspect(req)
        found.v2v = v2v.available()  # whether ``vm import --convert`` can run here
        return found

    async def status(self, task_id: str, wait_s: float = 0.0) -> TransferStatus:
        """A task's status; with ``wait_s``, answered as soon as it ends or after that long (a long poll:
        the control plane hears of the end at once, without polling often)."""
        self._prune()
        t = self._tasks.get(task_id)
        if t is None:
            raise NotFound(f"no transfer {task_id!r} on this host (the agent may have restarted)")
        if wait_s > 0 and t.task is not None and not t.task.done():
            await asyncio.wait({t.task}, timeout=wait_s)  # the caller's own cancellation goes through
        return t.status.model_copy()

    async def cancel(self, task_id: str) -> TransferStatus:
        """End a task (its files are removed unless it succeeded) and forget it."""
        t = self._tasks.get(task_id)
        if t is None:
            raise NotFound(f"no transfer {task_id!r} on this host")
        await self._stop(t)
        self._tasks.pop(task_id, None)
        return t.status.model_copy()

    async def cancel_target(self, path: str | Path) -> None:
        """Stop whatever task is making the file ``path`` (it is being deleted)."""
        real = str(Path(path).resolve())
        for t in list(self._tasks.values()):
            if t.status.state == "running" and real in t.status.targets:
                await self._stop(t)

    async def close(self) -> None:
        for t in list(self._tasks.values()):
            await self._stop(t)

    async def _stop(self, t: Task) -> None:
        if t.task is not None and not t.task.done():
            t.task.cancel()
            await asyncio.wait({t.task}, timeout=30)  # it kills qemu-img and removes its file

    def _prune(self) -> None:
        now = time.monotonic()
        for tid, t in list(self._tasks.items()):
            if t.finished_at is not None and now - t.finished_at > KEEP_DONE_S:
                self._tasks.pop(tid, None)

    def _start(self, status: TransferStatus, body: Callable[[Task], Awaitable[dict[str, Any]]]) -> TransferStatus:
        t = Task(status)
        self._tasks[status.id] = t

        async def run() -> None:
            try:
                t.status.result = await body(t)
                t.status.state, t.status.progress, t.status.step = "succeeded", 1.0, "done"
            except asyncio.CancelledError:
                t.status.state = "failed"
                t.status.error = {"code": "cancelled", "message": f"transfer {status.id} was cancelled", "details": {}}
            except KasouError as e:
                t.status.state, t.status.error = "failed", e.to_dict()
            except Exception as e:  # a bug: the task must still end, and say so
                log.exception("transfer %s failed", status.id)
                t.status.state = "failed"
                t.status.error = {"code": "internal", "message": f"{type(e).__name__}: {e}", "details": {}}
            finally:
                t.finished_at = time.monotonic()

        t.task = asyncio.create_task(run(), name=f"transfer-{status.id}")
        return status.model_copy()

    # -- import ------------------------------------------------------------------------------------

    def start_import(self, req: DiskImport) -> TransferStatus:
        src = req.source
        if src is not None:  # the control plane sends what the inspection found: checked again all the same
            archive = self.sources.resolve(src.path)
            if src.member is not None:
                end = (src.offset or 0) + (src.length or 0)
                if src.offset is None or src.length is None or end > archive.stat().st_size:
                    raise InvalidSpec(f"{src.file}: its place in {archive.name} is not inside the archive")
        dest = self.disks.new_disk_path(req.vm, req.disk_id, req.shared, req.pool, req.pool_path)
        status = TransferStatus(id="t" + secrets.token_hex(6), kind="import", vm=req.vm, targets=[str(dest)],
                                step="starting")  # fmt: skip

        async def body(t: Task) -> dict[str, Any]:
            try:
                return await self._import(t, req, dest)
            except BaseException:
                self.disks.remove_new_disk(dest)
                raise

        return self._start(status, body)

    async def _import(self, t: Task, req: DiskImport, dest: Path) -> dict[str, Any]:
        src = req.source
        if src is None:
            await t.progress(0.5, "making an empty disk")
            await imagefiles.run("qemu-img", "create", "-q", "-f", "qcow2", str(dest), str(req.size_bytes), timeout=60)
            return (await self.disks.info(dest)).model_dump()
        path = Path(src.path)
        share = 1.0
        if src.digest is not None:
            share = 0.6
            algo, want = src.digest.split(":", 1)
            start = src.offset or 0
            length = src.length if src.length is not None else path.stat().st_size
            await t.progress(0.0, f"checking {algo.upper()} of {src.file} against the manifest")
            loop = asyncio.get_running_loop()

            def tick(f: float) -> None:
                t.status.progress = max(t.status.progress, 0.4 * f)

            got = await loop.run_in_executor(None, ova.hash_range, path, start, length, algo, tick)
            if got != want:
                raise ImageError(f"{src.file} does not match the OVF manifest ({algo.upper()} {got[:12]}..., "
                                 f"listed {want[:12]}...): the package is damaged")  # fmt: skip
        base = 1.0 - share
        argv = ["qemu-img", "convert", "-p", *convert_source(src), "-O", "qcow2", str(dest)]
        await t.progress(base, f"converting {src.file}")

        async def on(f: float) -> None:
            await t.progress(base + share * f)

        try:
            await run_with_progress(argv, on)
        except ImageError as e:
            fmt = {"vpc": "vhd"}.get(src.format, src.format)
            raise ImageError(f"cannot convert {src.file} ({fmt}): {e.message}") from None
        if req.size_bytes > src.virtual_size:  # an OVF disk larger than its file
            await imagefiles.run("qemu-img", "resize", "-q", "-f", "qcow2", str(dest), str(req.size_bytes), timeout=60)
        return (await self.disks.info(dest)).model_dump()

    # -- conversion (virt-v2v) ----------------------------------------------------------------------

    def start_convert(self, req: GuestConvert) -> TransferStatus:
        """Run virt-v2v in place on a new VM's disks; it makes no file of its own (a failure leaves the disks
        to the import, which removes them)."""
        paths = [str(self.disks.check_disk_path(d)) for d in req.disks]
        status = TransferStatus(id="t" + secrets.token_hex(6), kind="convert", vm=req.vm, step="starting virt-v2v")
        workdir = self.disks.disks_dir.parent / "v2v"

        async def body(t: Task) -> dict[str, Any]:
            async def on(fraction: float, step: str) -> None:
                await t.progress(fraction, step)

            return await v2v.convert(req.vm, [(p, "qcow2") for p in paths], workdir, on, kvm=self.accelerator == "kvm")

        return self._start(status, body)

    # -- export ------------------------------------------------------------------------------------

    def start_export(self, req: ExportCreate) -> TransferStatus:
        target = self.sources.new_file(req.file)
        for d in req.disks:
            self.disks.check_disk_path(d.path)
        status = TransferStatus(id="t" + secrets.token_hex(6), kind="export", vm=req.vm, targets=[str(target)],
                                step="starting")  # fmt: skip
        return self._start(status, lambda t: self._export(t, req, target))

    async def _export(self, t: Task, req: ExportCreate, target: Path) -> dict[str, Any]:
        scratch = target.parent / f".{target.name}.{secrets.token_hex(4)}"
        scratch.mkdir(mode=0o700)
        try:
            sizes = [int((await imagefiles.info(d.path))["virtual-size"]) for d in req.disks]
            total = sum(sizes) or 1
            done = 0
            files: list[tuple[str, Path]] = []
            disks: list[ExportDisk] = []
            for d, size in zip(req.disks, sizes, strict=True):
                name = f"{req.vm}-{d.id}.vmdk"
                out = scratch / name
                await t.progress(0.9 * done / total, f"converting {d.id} to a streamOptimized vmdk")
                base = done

                async def on(f: float, base: int = base, size: int = size) -> None:
                    await t.progress(0.9 * (base + f * size) / total)

                await run_with_progress(["qemu-img", "convert", "-p", "-f", d.format, "-O", "vmdk", "-o",
                                         "subformat=streamOptimized", d.path, str(out)], on)  # fmt: skip
                done += size
                files.append((name, out))
                disks.append(ExportDisk(href=name, file_bytes=out.stat().st_size, capacity_bytes=size))
            await t.progress(0.9, "writing the descriptor and the manifest")
            descriptor = scratch / f"{req.vm}.ovf"
            descriptor.write_bytes(write_ovf(req.ovf.model_copy(update={"disks": disks})))
            loop = asyncio.get_running_loop()
            lines = []
            for name, f in [(descriptor.name, descriptor), *files]:
                digest = await loop.run_in_executor(None, ova.hash_range, f, 0, f.stat().st_size, "sha256", None)
                lines.append(f"SHA256({name})= {digest}\n")
            manifest = scratch / f"{req.vm}.mf"
            manifest.write_text("".join(lines))
            await t.progress(0.95, f"writing {target.name}")
            ordered = [(descriptor.name, descriptor), (manifest.name, manifest), *files]  # OVF order: descriptor first
            size = await loop.run_in_executor(None, ova.write_ova, target, ordered)
            return {"file": str(target), "bytes": size, "disks": [d.model_dump() for d in disks]}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def add_transfer_routes(app: FastAPI, transfers: Transfers) -> None:
    """The agent's routes of :class:`Transfers`."""

    @app.post("/agent/v1/transfers/inspect")
    async def inspect(req: ImportInspect) -> ImportSource:
        return await transfers.inspect(req)

    @app.post("/agent/v1/transfers/imports")
    async def start_import(req: DiskImport) -> TransferStatus:
        return transfers.start_import(req)

    @app.post("/agent/v1/transfers/exports")
    async def start_export(req: ExportCreate) -> TransferStatus:
        return transfers.start_export(req)

    @app.post("/agent/v1/transfers/conversions")
    async def start_convert(req: GuestConvert) -> TransferStatus:
        return transfers.start_convert(req)

    @app.get("/agent/v1/transfers/{task_id}")
    async def transfer_status(task_id: str, wait_s: float = Query(0.0, ge=0, le=10)) -> TransferStatus:
        return await transfers.status(task_id, wait_s)

    @app.delete("/agent/v1/transfers/{task_id}")
    async def cancel_transfer(task_id: str) -> TransferStatus:
        return await transfers.cancel(task_id)
