"""What every image recipe shares: running a build tool, writing a guest's file, reporting progress.

A recipe (:mod:`kasou.image.tiny`, :mod:`kasou.image.debian`) and the import of a disk
(:mod:`kasou.image.importing`) run Debian's tools (``mke2fs``, ``sfdisk``, ``mmdebstrap``,
``qemu-img`` ...) through :func:`run`, so that every failure is one line that names the tool and,
for a tool that is missing, the Debian package that brings it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from kasou.errors import ImageError

__all__ = ["TOOL_PACKAGES", "Progress", "mounts_under", "one_line", "run", "run_streaming", "write_file"]

#: ``progress(step, fraction)``: what the build does now, and how far it is (0.0 to 1.0).
Progress = Callable[[str, float], None]

#: The Debian package that brings each tool, for the hint in "not installed" errors.
TOOL_PACKAGES: Mapping[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "mke2fs": "e2fsprogs",
    "cpio": "cpio",
    "zstd": "zstd",
    "mmdebstrap": "mmdebstrap",
    "sfdisk": "fdisk",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "qemu-img": "qemu-utils",
    "unshare": "util-linux",
    "chroot": "coreutils",
}


def one_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a tool's output (where tools put the reason they failed)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last[:limit]


def run(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    ok: Collection[int] = (0,),
) -> str:
    """Run a tool and return its standard output; any failure is an :class:`ImageError` with one line.

    The tool runs with ``LC_ALL=C`` (messages in English, whatever the host's locale) and ``env``
    added to this process's environment, reading ``stdin`` (if given) as its standard input. A tool
    that runs longer than ``timeout`` seconds is killed; an exit status not in ``ok`` is a failure.
    """
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C", **(env or {})},
        )
    except FileNotFoundError as exc:
        package = TOOL_PACKAGES.get(os.path.basename(cmd[0]))
        hint = f" (apt-get install {package})" if package else ""
        raise ImageError(f"required tool '{cmd[0]}' is not installed{hint}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"'{' '.join(cmd[:2])}' timed out after {timeout:.0f} s") from exc
    if proc.returncode not in ok:
        why = one_line(proc.stderr) or one_line(proc.stdout) or f"exit status {proc.returncode}"
        raise ImageError(f"'{' '.join(cmd[:2])}' failed: {why}")
    return proc.stdout


def write_file(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write a guest's file (and the directories above it), with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(mode)


def run_streaming(cmd: Sequence[str], *, timeout: float, on_line: Callable[[str], None]) -> None:
    """Run a long tool, handing each line it prints (standard output and error) to ``on_line``.

    The tool runs in a process group of its own: at ``timeout`` the whole group is killed (a
    tool's children, such as apt and dpkg under mmdebstrap, must not go on writing into a
    directory the caller is about to remove). A failure is an :class:`ImageError` with the
    tool's last line.
    """
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        package = TOOL_PACKAGES.get(os.path.basename(cmd[0]))
        hint = f" (apt-get install {package})" if package else ""
        raise ImageError(f"required tool '{cmd[0]}' is not installed{hint}") from exc
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    last = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the group is killed: the pipe's writers are gone
            if line.strip():
                last = line.strip()
                on_line(last)
        code = proc.wait(timeout=30)
    except BaseException:
        kill()
        proc.wait(timeout=30)
        raise
    finally:
        timer.cancel()
        _end_group(proc.pid)
    if timed_out.is_set():
        raise ImageError(f"'{' '.join(cmd[:2])}' timed out after {timeout:.0f} s")
    if code != 0:
        raise ImageError(f"'{' '.join(cmd[:2])}' failed: {last[:300] or f'exit status {code}'}")


def _end_group(pgid: int) -> None:
    """Kill what is left of a finished tool's process group, and wait (bounded) until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def mounts_under(path: Path) -> list[str]:
    """The mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    base = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)
