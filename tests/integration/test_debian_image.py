"""The debian image (Debian 12 from Debian's packages) on real QEMU under TCG.

``-m debian`` selects these tests. The image is built once per machine (``kasou image build
debian``, cached in the images directory like ``tiny``); a cold build downloads about 170 MB of
packages from the host's Debian mirror.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.image import load_image
from tests.integration.conftest import KASOU, Kasou, pid_alive

BUILD_TIMEOUT_S = 1800  # a cold build takes 1-2.5 minutes here (docs/images.md); a slow mirror, more
BOOT_TIMEOUT_S = 420  # to the writer's first "seq" under TCG on a loaded 2-core machine
# The first test also builds the image (its fixture's time counts against the test's timeout).
pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.timeout(BUILD_TIMEOUT_S + 3 * BOOT_TIMEOUT_S)]
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")  # Microsoft's keys enrolled: Secure Boot enforcing


@pytest.fixture(scope="session")
def debian_image(tiny_image: Path) -> Path:
    """The images directory, with the debian image built (or found cached) in it."""
    t0 = time.monotonic()
    r = subprocess.run([*KASOU, "image", "build", "debian"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    print(f"\nkasou image build debian: {time.monotonic() - t0:.0f} s; {r.stdout.strip()}")
    return tiny_image


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()]


def test_debian_boots_through_kasou_and_keeps_every_acknowledged_write(kasou: Kasou, debian_image: Path) -> None:
    """vm create --image debian --start: BIOS, GRUB, systemd, the writer; a graceful shutdown; the writes are there."""
    t0 = time.monotonic()
    kasou.run("vm", "create", "deb1", "--image", "debian", "--memory", "512", "--start", timeout=300)
    created = time.monotonic() - t0  # the disk copied from the image, QEMU started
    first_seq = kasou.wait_for("the first seq", lambda: kasou.seqs("deb1") and time.monotonic() - t0,
                               timeout=BOOT_TIMEOUT_S, every=0.2)  # fmt: skip
    vm = kasou.wait_ready("deb1", timeout=BOOT_TIMEOUT_S)
    ready = time.monotonic() - t0
    assert vm["state"] == "running"
    assert vm["disks"][0]["size_bytes"] == 4 * 1024**3
    kasou.wait_for("seq lines", lambda: len(kasou.seqs("deb1")) >= 3, timeout=60)
    log = _lines(kasou.log("deb1"))
    for line in ("firmware bios", "secureboot 0", "tpm 0", "recovered 0", "KASOU-READY"):
        assert line in log, f"{line!r} missing from the console: {log[-40:]}"
    assert log.index("KASOU-READY") < next(i for i, ln in enumerate(log) if ln.startswith("seq "))
    print(f"\ndebian under kasou (TCG, BIOS), seconds after vm create: created and started {created:.1f}, "
          f"first seq {first_seq:.1f}, guest ready {ready:.1f}")  # fmt: skip

    # The ACPI power button: systemd stops the writer (it says so) and powers off.
    t1 = time.monotonic()
    kasou.run("vm", "shutdown", "deb1", "--timeout", "120", timeout=180)
    took = time.monotonic() - t1
    print(f"graceful shutdown {took:.1f} s")
    assert took < 60, f"the guest took {took:.0f} s to power off (a stop job hung?)"
    assert kasou.vm("deb1")["state"] == "stopped"
    assert kasou.json("vm", "history", "deb1")[-1]["detail"] == "graceful shutdown"
    log = _lines(kasou.log("deb1"))
    assert "KASOU-SHUTDOWN" in log
    oops = [ln for ln in log if "Call Trace" in ln or "invalid opcode" in ln or "Kernel panic" in ln]
    assert not oops, f"the guest's kernel complained: {oops}"  # e.g. a CPU model TCG cannot run
    last = kasou.seqs("deb1")[-1]

    t1 = time.monotonic()
    kasou.run("vm", "start", "deb1", timeout=120)
    kasou.wait_ready("deb1", timeout=BOOT_TIMEOUT_S)
    print(f"ready again {time.monotonic() - t1:.1f} s after start")
    recovered = kasou.wait_for(
        "recovered line", lambda: [ln for ln in _lines(kasou.log("deb1")) if ln.startswith("recovered ")], timeout=60
    )
    assert int(recovered[0].split()[1]) >= last
    kasou.wait_for("seq after restart", lambda: any(n > last for n in kasou.seqs("deb1")), timeout=60)
    kasou.run("vm", "stop", "deb1")
    kasou.run("vm", "delete", "deb1")
    assert kasou.json("vm", "list") == []


@pytest.fixture
def bare_qemu() -> Iterator[list[subprocess.Popen[bytes]]]:
    """QEMU processes a test starts by hand: each is killed (by pid) and reaped at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.monotonic() + 10
        while pid_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_debian_boots_uefi_with_secure_boot_enforcing(
    debian_image: Path, bare_qemu: list[subprocess.Popen[bytes]]
) -> None:
    """OVMF (4M) with Microsoft's keys: shim (Microsoft-signed) -> GRUB -> kernel (Debian-signed); the
    guest itself sees Secure Boot on. Bare QEMU: kasou's own --firmware comes later (issue 15 §3)."""
    art = load_image(debian_image, "debian")
    assert "uefi-secure" in art.firmware
    work = Path(tempfile.mkdtemp(prefix="kasou-uefi-", dir="/tmp"))
    try:
        disk = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(art.disk), str(disk)],
                       check=True, timeout=60)  # fmt: skip
        vars_copy = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        serial = work / "serial.log"
        argv = [
            "qemu-system-x86_64", "-name", "guest=kasou-uefi-check",
            "-machine", "q35,smm=on", "-accel", "tcg,tb-size=64", "-m", "512", "-smp", "1",
            "-nodefaults", "-display", "none", "-vga", "std",
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-chardev", f"file,id=s0,path={serial}", "-serial", "chardev:s0",
            "-blockdev", f"driver=file,filename={disk},node-name=f0",
            "-blockdev", "driver=qcow2,file=f0,node-name=d0", "-device", "virtio-blk-pci,drive=d0",
        ]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        bare_qemu.append(proc)
        deadline = t0 + BOOT_TIMEOUT_S
        text = ""
        while "seq 1" not in text:
            assert proc.poll() is None, f"QEMU ended: {proc.stderr.read().decode() if proc.stderr else ''}"
            assert time.monotonic() < deadline, f"no 'seq 1' within {BOOT_TIMEOUT_S} s: {text[-2000:]!r}"
            time.sleep(0.2)
            text = serial.read_text(errors="replace") if serial.exists() else ""
        print(f"\ndebian under bare QEMU (TCG, UEFI Secure Boot): first seq {time.monotonic() - t0:.1f} s")
        lines = _lines(text)
        assert "firmware uefi" in lines
        assert "secureboot 1" in lines
        assert "recovered 0" in lines and "KASOU-READY" in lines
    finally:
        shutil.rmtree(work, ignore_errors=True)
