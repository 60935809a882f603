"""A disk image's content as a plain read-only file, and which of its chunks a generation changed.

``raw_view`` exports an image (qcow2 through its whole backing chain, or raw) read-only over FUSE with
``qemu-storage-daemon``: the mount point reads as the guest-visible bytes, so a reader seeks to any chunk and
reads only what it needs (an incremental backup sends the backup server only its changed chunks). The
daemon is ended, and the mount point removed, however the block ends; every wait is bounded.

``changed_chunks`` reads ``qemu-img map`` of a generation whose backing file is the previous generation:
the clusters its own layer holds (depth 0) are the ones written since, i.e. the chunks to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kasou.errors import ImageError, OperationTimeout

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MAP_TIMEOUT_S = 600.0


def _mounted(point: Path) -> bool:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return False
    return any(line.split()[4] == str(point) for line in text.splitlines() if len(line.split()) > 4)


@contextlib.contextmanager
def raw_view(image: Path | str, fmt: str = "qcow2", scratch: Path | None = None) -> Iterator[Path]:
    """A read-only file showing ``image``'s guest-visible content (with its backing chain), while the block runs."""
    image = Path(image)
    if not image.is_file():
        raise ImageError(f"{image} does not exist")
    if fmt not in ("qcow2", "raw"):
        raise ImageError(f"cannot read a {fmt} image")
    workdir = Path(tempfile.mkdtemp(prefix="rawview-", dir=scratch))
    point = workdir / "view"
    point.touch()
    pidfile = workdir / "pid"
    argv = [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f,filename={image},read-only=on",
        "--blockdev", f"driver={fmt},node-name=d,file=f,read-only=on",
        "--export", f"type=fuse,id=e,node-name=d,mountpoint={point},writable=off",
        "--daemonize", "--pidfile", str(pidfile),
    ]  # fmt: skip
    pid: int | None = None
    try:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise OperationTimeout(
                f"qemu-storage-daemon did not export {image.name} in {START_TIMEOUT_S:.0f} s"
            ) from None
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            raise ImageError(f"cannot read {image.name}: {lines[-1] if lines else f'exit status {r.returncode}'}")
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _mounted(point):
            if time.monotonic() > deadline:
                raise OperationTimeout(f"the view of {image.name} was not mounted within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        yield point
    finally:
        _stop(pid, point)
        for p in (pidfile, point):
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            workdir.rmdir()


def _stop(pid: int | None, point: Path) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if _mounted(point):  # the daemon died without unmounting: do it for it
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=STOP_TIMEOUT_S)


def changed_chunks(image: Path | str, chunk_size: int) -> set[int]:
    """The chunk indices holding a cluster of ``image``'s own layer (written since its backing file was made)."""
    try:
        r = subprocess.run(["qemu-img", "map", "--output=json", "-U", str(image)], capture_output=True, text=True,
                           timeout=MAP_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise OperationTimeout(f"qemu-img map of {Path(image).name} took over {MAP_TIMEOUT_S:.0f} s") from None
    if r.returncode != 0:
        raise ImageError(f"cannot map {Path(image).name}: {r.stderr.strip().splitlines()[-1:]}")
    out: set[int] = set()
    for e in json.loads(r.stdout):
        if int(e.get("depth", 0)) != 0 or not e.get("present", e.get("data", False) or e.get("zero", False)):
            continue
        start, length = int(e["start"]), int(e["length"])
        if length > 0:
            out.update(range(start // chunk_size, (start + length - 1) // chunk_size + 1))
    return out
