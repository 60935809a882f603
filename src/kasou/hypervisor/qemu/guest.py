"""What a VM's guest tells the host on its own channels (virtio-serial ports beside the QMP monitor):
the heartbeat of kasou's test guest (``hb <uptime>`` lines)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any


async def read_heartbeat(vm: Any, alive: Callable[[], bool]) -> None:
    """Read the ``hb <uptime>`` lines kasou's test guest writes on its virtio-serial port into ``vm``'s
    ``guest_uptime``, ``last_heartbeat`` (monotonic) and ``guest_ready``, while ``alive()``."""
    while alive():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(vm.files.heartbeat)), 5.0)
        except (TimeoutError, OSError):
            await asyncio.sleep(0.5)
            continue
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                parts = line.decode(errors="replace").split()
                if len(parts) == 2 and parts[0] == "hb":
                    with contextlib.suppress(ValueError):
                        vm.guest_uptime = float(parts[1])
                        vm.last_heartbeat = time.monotonic()
                        vm.guest_ready = True
        except (OSError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await asyncio.sleep(0.2)
