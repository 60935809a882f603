"""Long operations as jobs: an id, progress, and a final result kept in the store.

A job runs as an asyncio task in the control plane. Its record survives a
restart of the control plane; a job that was running when the control plane
died is marked failed ("interrupted") at the next start, never left pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kasou.control.records import JobRecord, JobState, VMRecord, job_key, vm_key
from kasou.errors import Conflict, KasouError, NotFound, OperationTimeout
from kasou.store.base import Store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.2


class JobContext:
    """What a running job's code sees: a way to report progress."""

    def __init__(self, jobs: Jobs, record: JobRecord) -> None:
        self._jobs = jobs
        self.record = record
        self._last_write = 0.0

    @property
    def id(self) -> str:
        return self.record.id

    async def progress(self, fraction: float, step: str | None = None) -> None:
        self.record.progress = max(0.0, min(1.0, fraction))
        if step is not None:
            self.record.step = step
        now = time.monotonic()
        if step is not None or now - self._last_write >= PROGRESS_EVERY_S:
            self._last_write = now
            await self._jobs.save(self.record)


JobFn = Callable[[JobContext], Awaitable[dict[str, Any] | None]]


class Jobs:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def save(self, rec: JobRecord) -> None:
        await self.store.put(job_key(rec.id), rec.model_dump(mode="json"))

    async def recover(self) -> int:
        """Fail every job left running by a control plane that died. Returns how many."""
        n = 0
        for e in await self.store.range("jobs/"):
            rec = JobRecord.model_validate(e.value)
            if not rec.done:
                rec.state = JobState.FAILED
                rec.finished_at = time.time()
                rec.error = {
                    "code": "interrupted",
                    "message": f"job {rec.id} ({rec.kind}) was interrupted by a restart of the control plane",
                    "details": {},
                }
                await self.save(rec)
                n += 1
        return n

    async def submit(
        self,
        kind: str,
        vm: str | None,
        fn: JobFn,
        on_done: Callable[[JobRecord], Awaitable[None]] | None = None,
        job_id: str | None = None,
        vm_uuid: str | None = None,
        department: str | None = None,
    ) -> JobRecord:
        """Run ``fn`` as a job. It belongs to VM ``vm`` (its uuid and department now); a job of no one VM (a bulk
        action) to ``vm_uuid`` and ``department`` if given: who may follow it (kasou.api.permissions)."""
        rec = JobRecord(id=job_id or "j" + secrets.token_hex(5), kind=kind, vm=vm, vm_uuid=vm_uuid,
                        department=department)  # fmt: skip
        if vm is not None:  # the job belongs to this VM (its uuid) and its department, for good
            e = await self.store.get(vm_key(vm))
            if e is not None:
                owner = VMRecord.model_validate(e.value)
                rec.vm_uuid, rec.department = owner.uuid, owner.department
        await self.save(rec)
        task = asyncio.create_task(self._run(rec, fn, on_done), name=f"job-{rec.id}-{kind}")
        self._tasks[rec.id] = task
        return rec.model_copy()

    async def _run(self, rec: JobRecord, fn: JobFn, on_done: Callable[[JobRecord], Awaitable[None]] | None) -> None:
        ctx = JobContext(self, rec)
        rec.state = JobState.RUNNING
        rec.started_at = time.time()
        try:
            await self.save(rec)
            result = await fn(ctx)
            rec.state = JobState.SUCCEEDED
            rec.progress = 1.0
            rec.result = result
        except asyncio.CancelledError:
            rec.state = JobState.FAILED
            rec.error = {"code": "cancelled", "message": f"job {rec.id} was cancelled", "details": {}}
        except KasouError as e:
            rec.state = JobState.FAILED
            rec.error = e.to_dict()
        except Exception as e:  # a bug: keep the job honest and the service alive
            log.exception("job %s failed", rec.id)
            rec.state = JobState.FAILED
            rec.error = {
                "code": "internal",
                "message": f"internal error: {type(e).__name__}: {e}",
                "details": {},
            }
        finally:
            rec.finished_at = time.time()
            with contextlib.suppress(Exception):
                if on_done is not None:
                    await on_done(rec)
            with contextlib.suppress(Exception):
                await self.save(rec)
            self._tasks.pop(rec.id, None)

    async def get(self, job_id: str) -> JobRecord:
        e = await self.store.get(job_key(job_id))
        if e is None:
            raise NotFound(f"no job {job_id!r}")
        return JobRecord.model_validate(e.value)

    async def department_of(self, rec: JobRecord) -> str | None:
        """The department a job belongs to: the one it carries; for a job made before kasou kept it, its VM's
        if that VM is the one that holds the name now (created before the job), else none."""
        if rec.vm_uuid is not None or rec.vm is None:
            return rec.department
        e = await self.store.get(vm_key(rec.vm))
        if e is None:
            return None
        owner = VMRecord.model_validate(e.value)
        return owner.department if owner.created_at <= rec.created_at else None

    async def list(self, vm: str | None = None, limit: int = 50) -> list[JobRecord]:
        recs = [JobRecord.model_validate(e.value) for e in await self.store.range("jobs/")]
        if vm is not None:
            recs = [r for r in recs if r.vm == vm]
        recs.sort(key=lambda r: r.created_at)
        return recs[-limit:]

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a running job; its own undo path runs (a cancelled migration stays on its source)."""
        rec = await self.get(job_id)
        task = self._tasks.get(job_id)
        if rec.done:
            raise Conflict(f"job {job_id} has already ended ({rec.state.value})")
        if task is None:
            raise Conflict(f"job {job_id} runs on another control plane; cancel it there")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), 120)
        return await self.get(job_id)

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            rec = await self.get(job_id)
            if rec.done:
                return rec
            if time.monotonic() >= deadline:
                raise OperationTimeout(f"job {job_id} did not finish within {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()
        for t in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 5)
