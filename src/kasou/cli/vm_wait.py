"""``kasou vm wait``: until a VM's guest is ready or the VM is in a state, for scripts."""

from __future__ import annotations

import time
from collections.abc import Sequence

import typer

from kasou.cli.common import client, fail, say
from kasou.cli.output import EXIT_ERROR, EXIT_TIMEOUT, EXIT_USAGE, JSON, OUTPUT, Col, columns, render_one, view
from kasou.errors import AgentUnavailable, OperationTimeout, StoreError
from kasou.model.state import VMState

WAIT_FOR = ("ready", *(s.value for s in VMState))


def register(vm_app: typer.Typer, vm_cols: Sequence[Col]) -> None:
    @vm_app.command("wait")
    def vm_wait(
        name: str,
        for_: str = typer.Option("ready", "--for", metavar="CONDITION",
                                 help="ready (running, and its guest answers), or a state: " + ", ".join(WAIT_FOR[1:])),
        timeout: float = typer.Option(300, "--timeout", help="Seconds to wait (then exit 5)."),
        output: str = OUTPUT, column: list[str] = columns(vm_cols), as_json: bool = JSON,
    ) -> None:  # fmt: skip
        """Wait until a VM is ready or in a state (for scripts: start the database, wait, then its applications).

        An API that does not answer for a while (restarted by an upgrade) is waited for too.
        Exits 0 and prints the VM (as ``vm show`` does); 5 after --timeout; 1 when the VM crashes, or stops after
        having been seen up, before it gets there (it will not get there by itself); 3 when there is no such VM.
        A host that does not answer makes its VMs ``unknown``: never taken for the state waited for."""
        if for_ not in WAIT_FOR:
            fail(f"--for {for_!r}: expected one of {', '.join(WAIT_FOR)}", EXIT_USAGE)
        if not 0 < timeout <= 86400:
            fail(f"--timeout {timeout:g}: expected more than 0 and at most 86400 seconds", EXIT_USAGE)
        view_ = view(output, column, as_json, vm_cols)
        c = client()
        deadline = time.monotonic() + timeout
        seen_up = False
        while True:
            try:
                v = c.get(f"/v1/vms/{name}")
            except (AgentUnavailable, StoreError, OperationTimeout) as e:  # the API restarting (an upgrade): not yet
                if time.monotonic() >= deadline:
                    fail(f"{name} was not {for_} after {timeout:g} s: {e.message}", EXIT_TIMEOUT)
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            state = v["state"] if v.get("host_reachable", True) else VMState.UNKNOWN.value
            if (state == VMState.RUNNING and v["guest_ready"]) if for_ == "ready" else state == for_:
                break
            seen_up = seen_up or state in (VMState.STARTING, VMState.RUNNING)
            if state == VMState.CRASHED or (state == VMState.STOPPED and seen_up):
                fail(f"{name} is {state}: it will not be {for_} by itself", EXIT_ERROR)
            if time.monotonic() >= deadline:
                not_yet = ", its guest not answering yet" if state == VMState.RUNNING and for_ == "ready" else ""
                fail(f"{name} was not {for_} after {timeout:g} s (it is {state}{not_yet})", EXIT_TIMEOUT)
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        render_one(v, vm_cols, view_, human=lambda: say(f"{name}: {for_}"))
