"""The CD drive of a running VM (part of :class:`kasou.hypervisor.qemu.driver.QemuDriver`): change its disc."""

from __future__ import annotations

import json

from kasou.errors import WrongState
from kasou.hypervisor.qemu import confine as cf
from kasou.hypervisor.qemu import media
from kasou.hypervisor.qemu import runfiles as rf
from kasou.hypervisor.qemu.cmdline import RuntimeFiles
from kasou.hypervisor.qemu.driver_core import DriverCore


class MediaOps(DriverCore):
    async def change_medium(self, name: str, iso: str | None) -> None:
        async with self._lock(name):
            vm = self._running(name)
            launched = rf.launch_spec(vm.files)
            if launched is None or not launched.cdrom_drive:
                raise WrongState(f"VM {name!r} has no CD drive (a VM gets one when it is created with --cdrom ISO)")
            path = self.iso_file(iso, name)  # NotFound or InvalidSpec before anything changes
            if path is None:
                await media.eject(self._exec(vm))
            else:
                if vm.identity is not None:  # read as the VM's own user: readable, never its own
                    cf.hand_over_disk(path, vm.identity, name, readonly=True)
                await media.insert(self._exec(vm), path)
            _record(vm.files, iso)


def _record(files: RuntimeFiles, iso: str | None) -> None:
    """Keep the launch record true (a restarted agent reads it)."""
    try:
        data = json.loads(files.launch.read_text())
    except (OSError, ValueError):
        return
    data.setdefault("spec", {})["cdrom"] = iso
    tmp = files.launch.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(files.launch)
