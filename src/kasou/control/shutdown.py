"""A graceful shutdown of a VM, as a job: the guest agent first, the ACPI power button, then a hard stop.

The guest agent's ``guest-shutdown`` shuts down a guest even where nothing listens to the power button
(a Linux without acpid or logind running, a Windows set to ignore it); the button is pressed too when the
agent's shutdown has not ended the guest in half the time; once the time is up, QEMU is stopped. The job's
result (``shutdown``: agent, acpi, stopped or hard-stop) and the ledger say which one ended the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from kasou.control.base import VMRecords
from kasou.control.hosts import Agents
from kasou.control.jobs import JobContext
from kasou.control.mirrors import Mirrors
from kasou.control.records import VMRecord
from kasou.errors import KasouError
from kasou.hypervisor.base import RuntimeState
from kasou.model.state import VMState

log = logging.getLogger(__name__)

#: How a graceful shutdown went, for the ledger.
SHUTDOWN_HOW = {"agent": "through the guest agent", "acpi": "with the ACPI power button"}


class ShutdownVMs(Protocol):
    """What a shutdown uses of :class:`kasou.control.vms.VMService`."""

    agents: Agents
    records: VMRecords
    mirrors: Mirrors

    async def stopped(self, rec: VMRecord, detail: str) -> None: ...


async def run(vms: ShutdownVMs, ctx: JobContext, rec: VMRecord, timeout: float) -> dict[str, Any]:
    """A graceful shutdown: through the guest agent when one answers (it shuts down even a guest that
    ignores ACPI), else the ACPI power button; the button too if the agent's shutdown has not ended the
    guest in half the time; stopped hard once ``timeout`` has passed. The result says which one worked."""
    agent = vms.agents.get(rec.host)
    await vms.mirrors.before_stop(rec)
    how = "acpi"
    now = await agent.info(rec.name)
    if now.guest.agent:
        await ctx.progress(0.05, "asking the guest agent to shut the guest down")
        try:
            await agent.action(rec.name, "guest-shutdown")
            how = "agent"
        except KasouError as e:  # it stopped answering meanwhile, or refuses: the button then
            log.info("VM %s: the guest agent's shutdown failed (%s); pressing the power button", rec.name, e)
    if how == "acpi":
        await ctx.progress(0.05, "pressing the power button")
        await agent.action(rec.name, "powerdown")
    await vms.records.set(rec.name, state=VMState.SHUTTING_DOWN)
    t0 = time.monotonic()
    while True:
        info = await agent.info(rec.name)
        if info.state in (RuntimeState.EXITED, RuntimeState.CRASHED):
            if info.exit_reason == "stopped":
                how = "stopped"
                detail = "stopped at once during a graceful shutdown"
            else:
                detail = f"graceful shutdown ({SHUTDOWN_HOW[how]})"
            break
        waited = time.monotonic() - t0
        if waited >= timeout:
            await ctx.progress(0.95, "the guest did not power off; stopping it")
            await agent.action(rec.name, "stop")
            detail = f"the guest did not power off within {timeout:.0f} s ({SHUTDOWN_HOW[how]}); stopped hard"
            how = "hard-stop"
            break
        if how == "agent" and waited >= timeout / 2:
            await ctx.progress(0.5, "the guest agent's shutdown has not ended the guest; pressing the power button")
            with contextlib.suppress(KasouError):
                await agent.action(rec.name, "powerdown")
            how = "acpi"
        await ctx.progress(0.05 + 0.9 * waited / timeout, f"waiting for the guest to power off ({waited:.0f} s)")
        await asyncio.sleep(0.25)
    await vms.stopped(rec, detail)
    return {"shutdown": how, "detail": detail}
