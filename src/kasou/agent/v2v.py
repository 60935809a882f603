"""``virt-v2v-in-place`` on a VM's imported disks: VMware (or Hyper-V, Xen) drivers out, virtio in.

``kasou vm import --convert`` runs this after the disks are converted to qcow2 in their pool
(:meth:`kasou.agent.transfers.Transfers.start_convert`). The tool comes from Debian's ``virt-v2v``
package (2.2 in bookworm); kasou only runs it where it is installed (:func:`available`).

How it is run:

- always with ``-i libvirtxml`` and a small domain XML listing every disk in boot order (the way
  virt-v2v documents for a guest of several disks; ``-i disk`` takes one disk only), so one disk and
  several are handled alike; ``--root first`` so that it never stops to ask on a multi-boot guest;
- ``LIBGUESTFS_BACKEND=direct``: libguestfs boots its small appliance VM with QEMU itself (no libvirtd);
  under the accelerator the agent's probe chose (:mod:`kasou.hypervisor.qemu.accel`): libguestfs itself
  trusts ``/dev/kvm``, and where KVM is there but guests abort under it, ``force_tcg`` is set. Under
  TCG it works but is slow, minutes per guest;
- in a process group of its own, killed whole (the appliance's QEMU with it) on cancel, on timeout
  (:data:`TIMEOUT_S`) and if the agent dies; ``TMPDIR`` and its overlay directory are a fresh directory
  under the agent's own directory, removed afterwards; the appliance it builds once is cached beside it.

What it changed is read from its output (:func:`parse_output`): the guest OS it found and converted,
whether the guest has virtio drivers, and its warnings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from kasou.errors import ImageError, OperationTimeout
from kasou.hypervisor.qemu.process import die_with_parent

TOOL = "virt-v2v-in-place"
NEEDS = ("nbdkit",)  # virt-v2v 2.x reads every input through nbdkit; bookworm's package does not pull it in
INSTALL = "apt-get install virt-v2v nbdkit"
TIMEOUT_S = 3600.0  # a whole conversion; under TCG a Debian guest takes a few minutes
TICK_S = 30.0  # virt-v2v is silent for minutes while it converts: its progress creeps on meanwhile
KEEP_LINES = 10000  # of its output (a few dozen lines without -v)
_STEP = re.compile(r"^\[\s*\d+(?:\.\d+)?\]\s+(.+?)\s*$")  # "[  12.3] Inspecting the source"
_CONVERTING = re.compile(r"^Converting (.+) to run on KVM$")
_PREFIX = re.compile(rf"^(?:{re.escape(TOOL)}|virt-v2v): ")
# the steps virt-v2v prints, in order, and how far along each one is
_STEPS = (("Setting up the source", 0.05), ("Opening the source", 0.1), ("Inspecting the source", 0.4),
          ("Checking for sufficient free disk space", 0.45), ("Converting", 0.5), ("Mapping filesystem", 0.85),
          ("Closing", 0.9), ("Finishing off", 0.95))  # fmt: skip


def available() -> bool:
    """Whether this host can convert guests (Debian's ``virt-v2v`` and ``nbdkit`` packages are installed)."""
    return all(shutil.which(t) is not None for t in (TOOL, *NEEDS))


def domain_xml(name: str, disks: list[tuple[str, str]]) -> str:
    """The minimal libvirt domain of ``virt-v2v-in-place -i libvirtxml``: the disks (path, format) in boot order."""
    devs = "".join(
        f"    <disk type='file' device='disk'>\n      <driver name='qemu' type={quoteattr(fmt)}/>\n"
        f"      <source file={quoteattr(path)}/>\n      <target dev='sd{chr(ord('a') + i)}' bus='scsi'/>\n"
        "    </disk>\n"
        for i, (path, fmt) in enumerate(disks)
    )
    return (f"<domain type='kvm'>\n  <name>{escape(name)}</name>\n  <memory>1048576</memory>\n  <vcpu>1</vcpu>\n"
            "  <os><type>hvm</type><boot dev='hd'/></os>\n  <features><acpi/><apic/><pae/></features>\n"
            f"  <devices>\n{devs}  </devices>\n</domain>\n")  # fmt: skip


def parse_output(text: str) -> dict[str, Any]:
    """What virt-v2v says it did: ``os`` (the guest it converted), ``changes`` and ``warnings`` (lines)."""
    os_name: str | None = None
    changes: list[str] = []
    warnings: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _STEP.match(line)
        if m:
            conv = _CONVERTING.match(m.group(1))
            if conv:
                os_name = conv.group(1)
                changes.append(f"converted {os_name} to run on KVM")
            continue
        line = _PREFIX.sub("", line)
        if line.startswith("warning: "):
            warnings.append(line.removeprefix("warning: "))
        elif line.startswith("This guest ") or line.lower().startswith(("removed ", "removing ", "uninstall")):
            changes.append(line.rstrip("."))
    return {"os": os_name, "changes": changes, "warnings": warnings}


def _step_progress(line: str) -> tuple[float, str] | None:
    m = _STEP.match(line.strip())
    if not m:
        return None
    for prefix, frac in _STEPS:
        if m.group(1).startswith(prefix):
            return frac, m.group(1)
    return None


async def convert(
    vm: str,
    disks: list[tuple[str, str]],
    workdir: Path,
    progress: Callable[[float, str], Awaitable[None]],
    timeout: float | None = None,
    kvm: bool = False,
) -> dict[str, Any]:
    """Run ``virt-v2v-in-place`` on a VM's disks (path, format; boot disk first). ImageError if it fails,
    OperationTimeout after ``timeout`` (default :data:`TIMEOUT_S`); cancelling kills it. Its appliance runs
    under KVM only if the agent's probe found KVM usable (``kvm``), else under TCG."""
    tool = shutil.which(TOOL)
    if tool is None or not available():
        raise ImageError(f"virt-v2v is not installed on this host: {INSTALL}")
    limit = TIMEOUT_S if timeout is None else timeout
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache = workdir / "cache"  # the appliance supermin builds, once per host
    cache.mkdir(mode=0o700, exist_ok=True)
    scratch = workdir / f"run-{vm}-{secrets.token_hex(4)}"
    scratch.mkdir(mode=0o700)
    try:
        xml = scratch / "domain.xml"
        xml.write_text(domain_xml(vm, disks))
        env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "TMPDIR": str(scratch), "VIRT_V2V_TMPDIR": str(scratch),
               "LIBGUESTFS_CACHEDIR": str(cache), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # fmt: skip
        if not kvm:  # libguestfs trusts /dev/kvm; on a host where KVM guests hang or abort, it must not
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        argv = [tool, "-i", "libvirtxml", "--root", "first", str(xml)]
        started = time.monotonic()
        out = await _run(argv, env, limit, progress)
        result = parse_output(out)
        result["seconds"] = round(time.monotonic() - started, 1)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _run(
    argv: list[str], env: dict[str, str], limit: float, progress: Callable[[float, str], Awaitable[None]]
) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env, start_new_session=True, preexec_fn=die_with_parent, limit=1 << 20,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
    at: tuple[float, str] = (0.0, "starting virt-v2v")  # the last step it printed, and how far along that is

    async def read() -> None:
        nonlocal at
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            step = _step_progress(line)
            if step is not None:
                at = step
                await progress(*step)
        await proc.wait()

    async def tick() -> None:  # a small step forward now and then, so that nobody takes it for stuck
        creep = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            creep = min(creep + 0.001, 0.04)
            await progress(at[0] + creep, at[1])

    ticker = asyncio.create_task(tick())
    try:
        try:
            await asyncio.wait_for(read(), limit)
        except TimeoutError:
            raise OperationTimeout(f"{TOOL} did not finish within {limit:.0f} s") from None
    finally:
        ticker.cancel()
        if proc.returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 30)
        _kill_group(proc.pid)  # what it left running (the appliance's QEMU)
    text = "\n".join(lines)
    if proc.returncode != 0:
        errors = [_PREFIX.sub("", ln.strip()) for ln in lines if ln.strip() and not _STEP.match(ln.strip())]
        said = [e for e in errors if e.startswith("error: ")] or errors
        first = said[0] if said else f"exit status {proc.returncode}"
        raise ImageError(f"{TOOL} failed: {first.removeprefix('error: ')}")
    return text


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
