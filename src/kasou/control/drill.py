"""Restore drills (``kasou backup drill``): prove that the backup server's newest generations bring the VMs back.

One job, VM after VM (in the restore plan's order, :meth:`kasou.control.offsite.Offsite.plan`): the generation
is restored as ``drill-<vm>`` with every NIC on an **isolated** network (no uplink: the copy never meets the
production VM's network), started, and waited for until its guest is ready (its readiness line or its guest
agent); then an optional check command runs inside it through the guest agent (e.g. a SQL query), and the
drill VM is deleted, whatever happened. Each VM's latest drill is kept (``drills/<vm>``: when, which
generation, how long restore and boot took, the check's exit code and output, or why it failed) and is an
event (``backup_drill``: info when it passed, error when it did not); the audit log has the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from kasou.control.records import JobRecord, JobState
from kasou.errors import InvalidSpec, KasouError, NotFound
from kasou.hypervisor.base import GuestExec
from kasou.model.spec import NetworkCreate, validate_name
from kasou.model.state import Action

if TYPE_CHECKING:
    from kasou.control.jobs import JobContext
    from kasou.control.offsite import Offsite, RestorePlanItem

PREFIX = "drills/"
READY_POLL_S = 1.0
CHECK_TIMEOUT_S = 300.0


class DrillRequest(BaseModel):
    """Body of ``POST /v1/backup-server/drill``."""

    model_config = ConfigDict(extra="forbid")

    key: dict[str, Any]  # the backup key's private part, for this drill only
    vms: list[str] | None = None  # default: every VM the backup server holds
    before: float | None = None  # only generations the server received before this time
    network: str = "drill"  # an isolated network (made if missing; an existing one must be isolated)
    check: dict[str, list[str]] = {}  # VM -> a command run in its restored guest through the guest agent
    timeout_s: float = Field(default=900.0, gt=0, le=86_400)  # per VM: restore, boot and check


class DrillResult(BaseModel):
    vm: str
    generation: int
    created: float  # the point in time the generation holds
    at: float  # when the drill ran
    ok: bool
    restore_s: float | None = None
    boot_s: float | None = None  # start to guest ready
    check: GuestExec | None = None
    error: str | None = None


def drill_name(vm: str) -> str:
    return validate_name(f"drill-{vm}"[:63])


class Drills:
    def __init__(self, offsite: Offsite) -> None:
        self.offsite = offsite
        self.vms = offsite.vms

    async def last(self) -> list[DrillResult]:
        return [DrillResult.model_validate(e.value) for e in await self.vms.store.range(PREFIX)]

    async def _network(self, name: str) -> None:
        validate_name(name, "network")
        try:
            await self.vms.networks.resolve(name)
        except InvalidSpec:  # unknown: made, isolated
            await self.vms.networks.create(NetworkCreate(name=name, isolated=True,
                                                         description="restore drills: no uplink"))  # fmt: skip
            return
        if not await self.vms.networks.is_isolated(name):
            raise InvalidSpec(f"network {name!r} is not isolated: a drill's restored VMs must not meet the production "
                              "network (give --network with a new name, or one made with --isolated)",
                              field="network")  # fmt: skip

    async def start(self, req: DrillRequest) -> JobRecord:
        """Check everything first (the key opens every generation, the network is isolated), then run the job."""
        for vm, argv in req.check.items():
            validate_name(vm)
            if not argv or not argv[0].startswith("/"):
                raise InvalidSpec(f"the check of {vm} must start with an absolute program path", field="check")
        plan = await self.offsite.plan(req.key, req.before, req.vms)
        unknown = sorted(set(req.check) - {p.vm for p in plan})
        if unknown:
            raise NotFound(f"a check is given for {', '.join(unknown)}, which the drill does not restore")
        for p in plan:
            with contextlib.suppress(NotFound):
                await self.vms.get(drill_name(p.vm))
                raise InvalidSpec(f"a VM named {drill_name(p.vm)} exists: delete it, or the drill would", field="vms")
        await self._network(req.network)

        async def run(ctx: JobContext) -> dict[str, Any]:
            results = []
            for i, p in enumerate(plan):
                await ctx.progress(i / len(plan), f"drill {i + 1}/{len(plan)}: {p.vm} (generation {p.generation})")
                results.append(await self._one(req, p))
            return {"drills": [r.model_dump(mode="json") for r in results], "ok": all(r.ok for r in results)}

        return await self.vms.jobs.submit("backup-drill", None, run)

    async def _one(self, req: DrillRequest, p: RestorePlanItem) -> DrillResult:
        name = drill_name(p.vm)
        res = DrillResult(vm=p.vm, generation=p.generation, created=p.created, at=time.time(), ok=False)
        made = False
        try:
            t0 = time.monotonic()
            _, job = await self.offsite.restore(p.vm, p.generation, name, req.key, network=req.network)
            made = True
            await self._finished(job.id, req.timeout_s, "the restore")
            res.restore_s = round(time.monotonic() - t0, 1)
            t1 = time.monotonic()
            await self._finished((await self.vms.action(name, Action.START)).id, req.timeout_s, "the start")
            await self._ready(name, t1 + req.timeout_s)
            res.boot_s = round(time.monotonic() - t1, 1)
            if p.vm in req.check:
                agent = self.vms.agents.get(str((await self.vms.get(name)).host))
                res.check = await agent.guest_exec(name, req.check[p.vm], min(CHECK_TIMEOUT_S, req.timeout_s))
                if res.check.exitcode != 0:
                    raise InvalidSpec(f"the check exited with {res.check.exitcode}: "
                                      f"{(res.check.stderr or res.check.stdout).strip()[-200:]}")  # fmt: skip
            res.ok = True
        except Exception as e:
            res.error = e.message if isinstance(e, KasouError) else f"{type(e).__name__}: {e}"
        finally:
            if made:
                with contextlib.suppress(Exception):
                    job = await self.vms.delete(name, force=True)
                    await self.vms.jobs.wait(job.id, 300)
        await self.vms.store.put(PREFIX + p.vm, res.model_dump(mode="json"))
        took = f"restore {res.restore_s} s, boot {res.boot_s} s"
        if res.ok:
            msg = f"restore drill of {p.vm} passed: generation {p.generation} restored and booted ({took})"
        else:
            msg = f"restore drill of {p.vm} FAILED (generation {p.generation}): {res.error}"
        with contextlib.suppress(Exception):
            await self.vms.events.emit("backup_drill", f"vm/{p.vm}", msg, "info" if res.ok else "error")
        return res

    async def _finished(self, job_id: str, timeout_s: float, what: str) -> None:
        job = await self.vms.jobs.wait(job_id, timeout_s)
        if job.state != JobState.SUCCEEDED:
            raise InvalidSpec(f"{what} failed: {(job.error or {}).get('message') or job.state}")

    async def _ready(self, name: str, deadline: float) -> None:
        while True:
            v = await self.vms.get(name)
            if v.guest_ready:
                return
            if time.monotonic() > deadline:
                raise InvalidSpec("the restored guest did not become ready in time (no readiness line, no agent)")
            await asyncio.sleep(READY_POLL_S)
