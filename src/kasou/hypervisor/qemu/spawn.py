"""Start one QEMU process and learn whether it came up, without ``-daemonize``.

QEMU's ``-daemonize`` forks and calls ``setsid``, which its own seccomp sandbox
(``-sandbox ...,elevateprivileges=deny,spawn=deny``) forbids, and ``-runas`` changes
user only after the filter is in place. So QEMU is started the way libvirt starts
it: the agent spawns ``qemu-system-x86_64`` directly, in a session of its own (killing
the agent, even with SIGKILL, leaves every VM running), already as the VM's user and
in the VM's cgroup (see :mod:`kasou.hypervisor.qemu.confine`), with its output in the
runtime directory.

``-daemonize`` used to tell synchronously whether QEMU started; now the start is over
when the QMP monitor sends its greeting (QEMU's main loop runs: every device, disk and
tap opened) or failed when the process ends first, with QEMU's last line of output as
the reason. A background thread waits for each child, so none lingers as a zombie
while the agent runs; after an agent restart the QEMUs it left behind are init's
children.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kasou.errors import QemuStartError
from kasou.hypervisor.qemu import process

#: QEMU initialises in well under a second; 60 s is a hung host.
START_TIMEOUT = 60.0


def _last_line(path: Path, binary: str) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    why = lines[-1]
    prefix = f"{Path(binary).name}: "
    for p in (f"{binary}: ", prefix):
        if why.startswith(p):
            return why[len(p) :]
    return why


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the child in a thread of its own: it never stays a zombie while the agent runs."""
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()


async def _greeted(qmp: Path, timeout: float) -> bool:
    """True once QEMU's QMP monitor sends its greeting (its main loop runs); False if the connection fails."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(qmp)), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"{")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def spawn(
    name: str,
    argv: list[str],
    qmp: Path,
    output: Path,
    pidfile: Path,
    before_exec: Callable[[], None] | None = None,
    timeout: float = START_TIMEOUT,
    pass_fds: Sequence[int] = (),
) -> int:
    """Start QEMU for VM ``name``; its pid once the monitor answers, else QemuStartError (nothing left).

    ``before_exec`` runs in the child before QEMU (to enter the VM's cgroup and become its user:
    :func:`kasou.hypervisor.qemu.confine.child_setup`).
    """
    with output.open("wb") as out:  # the agent's file: QEMU writes through the descriptor it inherits
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),  # the taps the agent opened (confine.open_taps)
                preexec_fn=before_exec,
            )
        except FileNotFoundError:
            raise QemuStartError(f"{argv[0]} is not installed on this host") from None
        except (PermissionError, subprocess.SubprocessError) as e:
            raise QemuStartError(f"cannot start QEMU for VM {name!r}: {e}") from None
    _reap(proc)
    pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or not process.alive(proc.pid):
            with contextlib.suppress(subprocess.TimeoutExpired):  # the reaper thread may hold it
                await asyncio.to_thread(proc.wait, 2.0)
            why = _last_line(output, argv[0]) or f"exit status {proc.returncode}"
            raise QemuStartError(f"QEMU refused to start VM {name!r}: {why}")
        left = deadline - time.monotonic()
        if left <= 0:
            await process.kill_hard(proc.pid)
            raise QemuStartError(f"QEMU for VM {name!r} did not start within {timeout:.0f} s")
        if qmp.exists() and await _greeted(qmp, min(left, 5.0)):
            return proc.pid
        await asyncio.sleep(0.01)
