"""Which accelerator this host uses: KVM only after a probe guest really booted under it.

On some hosts ``/dev/kvm`` opens and KVM_CREATE_VM works, yet a Linux guest
hangs right after the firmware hands over to the kernel. So kasou never trusts
the device node: it boots the tiny guest under KVM with a hard timeout and uses
KVM only if the guest printed its readiness line. Otherwise TCG (software
emulation). The decision is cached per boot of the host and QEMU version
(``/run/kasou/accel.json``); ``KASOU_ACCEL=kvm|tcg`` forces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from kasou.config import accel_setting
from kasou.errors import ImageNotFound
from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu import process
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv

READY_LINE = "KASOU-READY"
PROBE_TIMEOUT = 15.0  # KVM boots the tiny guest in well under a second; TCG needs ~2.5 s
CACHE = Path("/run/kasou/accel.json")


@dataclass
class AccelDecision:
    accelerator: str  # "kvm" or "tcg"
    reason: str
    kvm_device: bool
    probe_seconds: float | None
    qemu_version: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return "not installed"
    first = out.splitlines()[0] if out else ""
    return first.split("version", 1)[1].strip().split()[0] if "version" in first else first


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_device_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist (no hardware virtualization, or the kvm module is not loaded)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return False, f"/dev/kvm cannot be opened: {e.strerror}"
    return True, "/dev/kvm opens"


async def probe_kvm(images_dir: Path, timeout: float = PROBE_TIMEOUT, binary: str = "qemu-system-x86_64") -> float:
    """Boot the tiny guest under KVM; return the seconds to readiness or raise TimeoutError/RuntimeError."""
    from kasou.image import load_image

    art = load_image(images_dir, "tiny")
    if art.kernel is None or art.initrd is None:
        raise RuntimeError("the tiny image has no kernel to boot; rebuild it: kasou image build tiny --force")
    tmp = Path(tempfile.mkdtemp(prefix="kasou-kvm-probe-", dir="/run" if os.access("/run", os.W_OK) else None))
    pid: int | None = None
    try:
        disk = tmp / "probe.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                art.disk_format,
                "-b",
                str(art.disk),
                str(disk),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        spec = LaunchSpec(
            name=f"kasou-kvm-probe-{os.getpid()}",
            uuid=str(uuid.uuid4()),
            vcpus=1,
            memory_mib=128,
            image="tiny",
            kernel_args_extra="kasou.writer=0",
            disks=[LaunchDisk(id="disk0", path=str(disk))],
        )
        files = RuntimeFiles(dir=tmp, serial_log=tmp / "serial.log")
        argv = build_argv(spec, files, "kvm", BootFiles(art.kernel, art.initrd, art.kernel_args), binary)
        t0 = time.monotonic()
        # A child of this process (QEMU's own output in a file: a pipe nobody reads could fill and stop it), killed
        # by the kernel if this process dies first (PR_SET_PDEATHSIG): a probe never outlives what started it.
        with open(tmp / "stderr.log", "wb") as errfile:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=errfile,
                start_new_session=True, preexec_fn=process.die_with_parent,
            )  # fmt: skip
        pid = proc.pid
        while time.monotonic() - t0 < timeout:
            if files.serial_log.exists() and READY_LINE in files.serial_log.read_text(errors="replace"):
                return time.monotonic() - t0
            if proc.returncode is not None or not process.alive(pid):
                lines = (tmp / "stderr.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(lines[-1] if lines else "the probe guest's QEMU exited")
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the probe guest did not boot under KVM within {timeout:.0f} s")
    finally:
        if pid is not None:
            await process.kill_hard(pid)
            with contextlib.suppress(TimeoutError, ProcessLookupError, ChildProcessError):
                await asyncio.wait_for(proc.wait(), 5)  # reaped: no zombie left
        shutil.rmtree(tmp, ignore_errors=True)


async def decide(images_dir: Path, *, refresh: bool = False, cache: Path = CACHE) -> AccelDecision:
    """Pick the accelerator for this host, probing KVM once per boot."""
    version = qemu_version()
    forced = accel_setting()  # kvm, tcg or auto; anything else is refused by name
    has_dev, dev_reason = kvm_device_usable()
    if forced in ("kvm", "tcg"):
        return AccelDecision(forced, f"forced by KASOU_ACCEL={forced}", has_dev, None, version)
    key = {"boot_id": _boot_id(), "qemu_version": version}
    if not refresh:
        try:
            cached = json.loads(cache.read_text())
            if all(cached.get(k) == v for k, v in key.items()):
                return AccelDecision(**cached["decision"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if not has_dev:
        decision = AccelDecision("tcg", f"software emulation (TCG): {dev_reason}", False, None, version)
    else:
        try:
            secs = await probe_kvm(images_dir)
            decision = AccelDecision(
                "kvm", f"a probe guest booted under KVM in {secs:.1f} s", True, round(secs, 2), version
            )
        except ImageNotFound:
            # Without the probe image we cannot prove KVM works: do not cache, ask again later.
            return AccelDecision(
                "tcg",
                "software emulation (TCG): /dev/kvm opens but KVM is unproven until the tiny image "
                "is built (kasou image build tiny)",
                True,
                None,
                version,
            )
        except (TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as e:
            decision = AccelDecision(
                "tcg", f"software emulation (TCG): /dev/kvm opens but a probe guest under KVM failed: {e}",
                True, None, version,
            )  # fmt: skip
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**key, "decision": decision.to_dict()}))
    except OSError:
        pass
    return decision
