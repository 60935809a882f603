"""The QEMU driver: runs each VM as a ``qemu-system-x86_64`` process driven over QMP.

The agent spawns QEMU in a session of its own, so a VM never belongs to the agent's
process group: killing the agent (even SIGKILL) leaves every VM running. Each VM has a
runtime directory (sockets, pid file, the launch spec, an exit record); after
a restart :meth:`QemuDriver.attach_all` finds every QEMU again from those
files and checks the pid really is that guest's QEMU. A VM whose process is
gone without an exit record is reported as crashed.

The class is put together from :mod:`kasou.hypervisor.qemu.driver_core` (lifecycle),
:mod:`kasou.hypervisor.qemu.driver_storage` (replication, mirrors, snapshots, backups),
:mod:`kasou.hypervisor.qemu.driver_migration`
(live migration, both sides), :mod:`kasou.hypervisor.qemu.driver_media` (the CD drive),
:mod:`kasou.hypervisor.qemu.stats` (resource figures) and
:mod:`kasou.hypervisor.qemu.driver_devices` (disks grown, disks and NICs plugged in and out) and
:mod:`kasou.hypervisor.qemu.driver_guest` (commands run in a guest by its agent).
"""

from __future__ import annotations

from kasou.errors import MonitorError
from kasou.hypervisor.qemu.driver_core import HEARTBEAT_FRESH_S, MIGRATED, QUIT_TIMEOUT, START_TIMEOUT, QemuVm
from kasou.hypervisor.qemu.driver_devices import DeviceOps
from kasou.hypervisor.qemu.driver_guest import GuestOps
from kasou.hypervisor.qemu.driver_media import MediaOps
from kasou.hypervisor.qemu.driver_migration import MigrationOps
from kasou.hypervisor.qemu.driver_storage import StorageOps
from kasou.hypervisor.qemu.stats import StatsOps


class QemuDriver(MigrationOps, StorageOps, StatsOps, MediaOps, DeviceOps, GuestOps):
    """Runs VMs as QEMU processes on this host."""


__all__ = ["HEARTBEAT_FRESH_S", "MIGRATED", "QUIT_TIMEOUT", "START_TIMEOUT", "MonitorError", "QemuDriver", "QemuVm"]
