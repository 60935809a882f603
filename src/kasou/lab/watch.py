"""Watching for the one thing HA must never do: two running copies of one VM.

Used by the HA tests and the failover benchmark on a lab, where every host's
QEMUs are processes of this machine. A QEMU counts as a running copy once it has
vCPU threads: while one daemonizes, its parent (same command line) has none.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _has_vcpus(pid: str) -> bool:
    try:
        return any((t / "comm").read_text().startswith("CPU ") for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False


def qemu_copies(names: list[str]) -> dict[str, int]:
    """How many QEMUs of each VM run on this machine, in any network namespace."""
    counts = dict.fromkeys(names, 0)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or b"qemu-system" not in args[0]:
            continue
        for a in args:
            if a.startswith(b"guest="):
                n = a[6:].split(b",")[0].decode()
                if n in counts and _has_vcpus(pid):
                    counts[n] += 1
    return counts


class DoubleRunWatch:
    """Samples every VM's QEMUs every 50 ms in a thread; ``doubles`` keeps each sample with a double run."""

    def __init__(self, names: list[str], every_s: float = 0.05) -> None:
        self.names = names
        self.every_s = every_s
        self.doubles: list[dict[str, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="double-run-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            c = qemu_copies(self.names)
            self.samples += 1
            if any(v > 1 for v in c.values()):
                self.doubles.append(c)

    def __enter__(self) -> DoubleRunWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)
