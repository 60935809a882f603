"""The replica side of the fake driver: replica daemons of fake hosts, entries in a registry of the process
(see :mod:`tests.doubles.driver`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kasou.errors import Conflict
from kasou.hypervisor.base import ReplicaExports
from kasou.hypervisor.qemu.migration import create_disk


@dataclass
class _Served:
    host: str
    port: int
    export: str
    path: Path


class FakeExports(ReplicaExports):
    """Replica daemons of fake hosts: entries in a registry shared by the whole process."""

    #: Served replicas: file path -> where.
    served: ClassVar[dict[Path, _Served]] = {}
    _next_port: ClassVar[int] = 20000

    async def create(self, path: Path, size_bytes: int) -> None:
        await create_disk(path, "qcow2", size_bytes)  # a real image file, as QEMU's exports make

    async def start(self, path: Path, export: str, listen_host: str, writethrough: bool) -> int:
        if path in FakeExports.served:
            raise Conflict(f"a replica daemon already serves {path}")
        FakeExports._next_port += 1
        FakeExports.served[path] = _Served(listen_host, FakeExports._next_port, export, path)
        return FakeExports._next_port

    def alive(self, path: Path) -> bool:
        return path in FakeExports.served

    async def stop(self, path: Path) -> None:
        FakeExports.served.pop(path, None)

    @staticmethod
    def kill(path: Path) -> None:
        """Test hook: the daemon of ``path`` dies (its VM's host sees the replica degraded)."""
        FakeExports.served.pop(path, None)

    @staticmethod
    def find(host: str, port: int, export: str) -> _Served | None:
        for s in FakeExports.served.values():
            if (s.host, s.port, s.export) == (host, port, export):
                return s
        return None


__all__ = ["FakeExports"]
