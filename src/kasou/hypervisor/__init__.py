"""The hypervisor layer: one driver interface, a QEMU driver and a fake for tests.

Process ids, QMP socket paths and QEMU node names stay inside this layer; the
host agent speaks only in :class:`LaunchSpec` and :class:`RuntimeInfo`.
"""

from kasou.hypervisor.base import Driver, LaunchDisk, LaunchSpec, RuntimeInfo, RuntimeState

__all__ = ["Driver", "LaunchDisk", "LaunchSpec", "RuntimeInfo", "RuntimeState"]
