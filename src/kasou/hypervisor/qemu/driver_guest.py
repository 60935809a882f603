"""The QEMU driver's commands run inside a guest through its agent (``guest-exec``): a restore drill's check
that a restored database answers, for one. Output is capped and decoded; every wait is bounded."""

from __future__ import annotations

import time

from kasou.errors import GuestAgentError, WrongState
from kasou.hypervisor.base import GuestExec, RuntimeState
from kasou.hypervisor.qemu.driver_core import DriverCore

OUTPUT_CAP = 64 * 1024


class GuestOps(DriverCore):
    async def guest_exec(self, name: str, argv: list[str], timeout_s: float) -> GuestExec:
        async with self._lock(name):
            vm = self._running(name)
            if vm.agent is None or vm.state != RuntimeState.RUNNING or not vm.agent_state.answering:
                raise WrongState(f"VM {name!r} has no guest agent answering: nothing can run in it")
            agent = vm.agent
        t0 = time.monotonic()
        try:
            code, out, err = await agent.run(argv, timeout_s)
        except GuestAgentError as e:
            raise WrongState(f"VM {name!r}: {e.message}") from None
        took = round(time.monotonic() - t0, 3)
        return GuestExec(exitcode=code, stdout=out[:OUTPUT_CAP].decode(errors="replace"),
                         stderr=err[:OUTPUT_CAP].decode(errors="replace"), seconds=took)  # fmt: skip
