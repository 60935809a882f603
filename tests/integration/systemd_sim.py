"""What systemd does to a service's processes, reproduced where PID 1 is not systemd.

A :class:`SimulatedUnit` reads KillMode=, KillSignal=, TimeoutStopSec= and SendSIGKILL= from a real
unit file and runs its main process as systemd would: in a session of its own (setsid) and in a
cgroup of its own (``<test slice>/<unit name>``) in the hierarchy systemd tracks services in: the
unified one on a cgroup v2 host (``/sys/fs/cgroup``), the ``name=systemd`` one on a hybrid or v1
host. Every process the main process starts stays in that cgroup unless it moves itself elsewhere
(kasou's confined QEMU does, into ``kasou/vm-*``, in the hierarchies it writes).

``stop()`` follows systemd.kill(5) ("KillMode="), for systemd 252 (Debian 12):

* ``control-group``: KillSignal (then SIGCONT) to every process in the unit's cgroup; when the
  TimeoutStopSec has passed and processes remain, SIGKILL to every one left (SendSIGKILL=yes).
* ``mixed``: KillSignal (then SIGCONT) to the main process only; then SIGKILL to every process left
  in the cgroup, once the main process has exited or the timeout has passed.
* ``process``: KillSignal (then SIGCONT) to the main process only; SIGKILL to it after the
  timeout; the other processes of the cgroup are left alone (and stay in it).

``restart()`` is ``stop()`` then ``start()`` with the same command, as ``systemctl restart`` does;
a new main process joins the cgroup next to whatever the old one left there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.packaging.units import one, read_unit

CGROUP_ROOT = Path("/sys/fs/cgroup")


def tracking_hierarchy(root: Path = CGROUP_ROOT) -> Path:
    """Where systemd keeps its units' processes: the v2 root, else the ``name=systemd`` hierarchy."""
    if (root / "cgroup.controllers").exists():
        return root
    if (root / "systemd" / "cgroup.procs").exists():
        return root / "systemd"
    return root / "unified"


def _seconds(value: str | None, default: float) -> float:
    if not value:
        return default
    v = value.strip()
    if v.endswith("min"):
        return float(v[:-3]) * 60
    return float(v.removesuffix("s"))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class SimulatedUnit:
    def __init__(self, unit_file: Path, slice_name: str, log: Path) -> None:
        u = read_unit(unit_file)
        self.name = unit_file.name
        self.kill_mode = one(u, "Service", "KillMode") or "control-group"
        self.kill_signal = signal.Signals[one(u, "Service", "KillSignal") or "SIGTERM"]
        self.timeout = _seconds(one(u, "Service", "TimeoutStopSec"), 90.0)
        self.send_sigkill = (one(u, "Service", "SendSIGKILL") or "yes") == "yes"
        self.hierarchy = tracking_hierarchy()
        self.cgroup = self.hierarchy / slice_name / self.name
        self.log = log
        self.main: subprocess.Popen[bytes] | None = None
        self.signalled: list[tuple[int, str]] = []  # (pid, signal name): what stop() sent, for the test to show

    def procs(self) -> list[int]:
        """Every process in the unit's cgroup and below it."""
        pids: list[int] = []
        for d in [self.cgroup, *self.cgroup.rglob("*")] if self.cgroup.exists() else []:
            if d.is_dir():
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in (d / "cgroup.procs").read_text().split()]
        return [p for p in pids if _alive(p)]

    def start(self, argv: list[str], env: dict[str, str]) -> int:
        self.cgroup.mkdir(parents=True, exist_ok=True)
        self._argv, self._env = argv, env
        procs = self.cgroup / "cgroup.procs"

        def enter() -> None:  # in the child, before exec: systemd forks, moves the child, then execs
            procs.write_text(str(os.getpid()))

        with open(self.log, "ab") as out:
            self.main = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=enter, close_fds=True,
            )  # fmt: skip
        return self.main.pid

    def _kill(self, pids: list[int], sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                self.signalled.append((pid, sig.name))

    def stop(self) -> None:
        assert self.main is not None
        main = self.main.pid
        first = [main] if self.kill_mode in ("process", "mixed") else self.procs()
        self._kill(first, self.kill_signal)
        self._kill(first, signal.SIGCONT)
        deadline = time.monotonic() + self.timeout

        def done() -> bool:
            if self.kill_mode == "process":
                return self.main is not None and self.main.poll() is not None
            if self.kill_mode == "mixed":
                return self.main is not None and self.main.poll() is not None
            return not self.procs()

        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.send_sigkill:
            if self.kill_mode == "process":
                if self.main.poll() is None:
                    self._kill([main], signal.SIGKILL)
            else:
                self._kill(self.procs(), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.main.wait(10)

    def restart(self) -> int:
        self.stop()
        return self.start(self._argv, self._env)

    def release(self) -> None:
        """End of the test: the processes still in the cgroup go back to the root, the cgroup goes."""
        for pid in self.procs():
            with contextlib.suppress(OSError):
                (self.hierarchy / "cgroup.procs").write_text(str(pid))
        for d in sorted([self.cgroup, *self.cgroup.rglob("*")], key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            self.cgroup.parent.rmdir()
