"""What a VM's runtime directory on its host says: its pid, exit record and launch spec, and small records
(replicas, mirrors) saved there atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from kasou.hypervisor.base import LaunchSpec, RuntimeState
from kasou.hypervisor.qemu.cmdline import RuntimeFiles


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def read_exit(files: RuntimeFiles) -> tuple[RuntimeState | None, str | None]:
    """The exit record: (EXITED or CRASHED, reason), or (None, None) if there is none."""
    try:
        data = json.loads(files.exit.read_text())
    except (FileNotFoundError, ValueError):
        return None, None
    state = RuntimeState.CRASHED if data.get("state") == "crashed" else RuntimeState.EXITED
    return state, str(data.get("reason") or "exited")


def launch_accel(files: RuntimeFiles) -> str | None:
    try:
        return json.loads(files.launch.read_text()).get("accelerator")
    except (FileNotFoundError, ValueError):
        return None


def remove_disks(paths: list[str]) -> None:
    """Remove disk files (and a TPM's state directory) made for an incoming migration, and their directory
    once it is empty."""
    for path in paths:
        if Path(path).is_dir() and not Path(path).is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(path).parent.rmdir()


def launch_spec(files: RuntimeFiles) -> LaunchSpec | None:
    try:
        return LaunchSpec.model_validate(json.loads(files.launch.read_text())["spec"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def state_of(status: Any) -> RuntimeState:
    s = status.get("status") if isinstance(status, dict) else None
    if s == "running":
        return RuntimeState.RUNNING
    return RuntimeState.PAUSED


def save_records(path: Path, records: dict[str, Any]) -> None:
    """Write ``{key: dataclass}`` as JSON at ``path`` atomically (a rename); no records: no file."""
    if not records:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: dataclasses.asdict(r) for k, r in records.items()}))
    tmp.replace(path)
