"""A TPM 2.0 per VM: an ``swtpm`` process beside its QEMU, its state a directory beside the VM's disks.

The agent manufactures a new TPM when the VM is created, as libvirt does (``swtpm_setup --tpm2
--createek --create-ek-cert --create-platform-cert --lock-nvram``: an endorsement key with a
certificate of this host's local CA, ``/var/lib/swtpm-localca``). Before each start of QEMU the
driver starts::

    swtpm socket --tpm2 --tpmstate dir=<state>,mode=0600 --ctrl type=unixio,path=<run>/swtpm.sock,mode=0600
                 --log file=<run>/swtpm.log,level=1 --terminate

as the VM's own user and in its cgroup (confined as QEMU is), and QEMU gets ``-chardev socket`` on that
control socket, ``-tpmdev emulator`` and a ``tpm-crb`` device. ``--terminate``: swtpm ends when QEMU's
connection goes (also when QEMU is killed and no agent watches); the driver ends whatever is left when
the VM ends or fails to start. The agent keeps swtpm's pid itself (``swtpm.pid``, its own file
in the runtime directory, checked against ``/proc`` before any signal), not a pid file the VM's
user could write.

Live migration: QEMU carries the TPM's state (permanent and volatile) in the migration stream when
both ends run swtpm. swtpm 0.7 locks its state directory while the TPM is initialised, and QEMU 7.2
initialises the destination's TPM as the waiting QEMU starts, so the destination's swtpm always
starts on a new empty directory (``tpm-2`` beside ``tpm``, and back again the next time) that the
migration fills; the VM's record then names it and the old one is deleted with the source's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kasou.errors import AlreadyExists, HypervisorError, OperationTimeout, QemuStartError
from kasou.hypervisor.qemu import process
from kasou.hypervisor.qemu.confine import Identity, searchable

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
SOCKET, PIDFILE, LOG, OUTPUT = "swtpm.sock", "swtpm.pid", "swtpm.log", "swtpm.out"
START_TIMEOUT = 10.0  # swtpm makes its socket within milliseconds
STOP_TIMEOUT = 5.0
SETUP_TIMEOUT = 60.0  # manufacturing: an RSA-2048 and an ECC key, their certificates (about 1 s)


def ctrl_socket(run_vm_dir: Path) -> Path:
    return run_vm_dir / SOCKET


def qemu_args(ctrl: Path) -> list[str]:
    """QEMU's side: a chardev on swtpm's control socket, the emulator backend, a CRB interface (TPM 2.0)."""
    return [
        "-chardev", f"socket,id=chrtpm,path={ctrl}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-crb,tpmdev=tpm0",
    ]  # fmt: skip


def swtpm_argv(state_dir: Path, run_vm_dir: Path, binary: str = SWTPM) -> list[str]:
    return [
        binary, "socket", "--tpm2",
        "--tpmstate", f"dir={state_dir},mode=0600",
        "--ctrl", f"type=unixio,path={ctrl_socket(run_vm_dir)},mode=0600",
        "--log", f"file={run_vm_dir / LOG},level=1",
        "--terminate",
    ]  # fmt: skip


async def manufacture(state_dir: Path, timeout: float = SETUP_TIMEOUT, binary: str = SWTPM_SETUP) -> None:
    """A new TPM's state in ``state_dir`` (which must not exist); nothing is left on failure."""
    if state_dir.exists():
        raise AlreadyExists(f"the TPM state {state_dir} already exists")
    if shutil.which(binary) is None:
        raise HypervisorError(f"{binary} is not installed on this host (apt-get install swtpm swtpm-tools)")
    state_dir.mkdir(parents=True, mode=0o700)
    argv = [binary, "--tpm2", "--tpmstate", str(state_dir), "--createek", "--create-ek-cert",
            "--create-platform-cert", "--lock-nvram", "--not-overwrite"]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise OperationTimeout(f"{binary} did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise HypervisorError(f"cannot make a TPM: {binary} failed: {why}")
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            state_dir.parent.rmdir()
        raise
    (state_dir / ".lock").unlink(missing_ok=True)


def hand_over(vm: str, state_dir: Path, ident: Identity) -> None:
    """The state directory and its files become the VM user's (0700 / 0600). Links are never followed
    and a file with a second name (a hard link the VM's user may have made to another file) is left alone."""
    if not state_dir.is_dir() or state_dir.is_symlink():
        raise QemuStartError(f"the TPM state of VM {vm!r} is missing: {state_dir}")
    searchable(state_dir)
    os.chown(state_dir, ident.uid, ident.gid, follow_symlinks=False)
    os.chmod(state_dir, 0o700)
    for entry in os.scandir(state_dir):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.chown(entry.path, ident.uid, ident.gid, follow_symlinks=False)
            os.chmod(entry.path, 0o600)


def pid_of(run_vm_dir: Path) -> int | None:
    """The VM's live swtpm (checked: an swtpm serving this VM's control socket), or None."""
    try:
        pid = int((run_vm_dir / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    args = process.cmdline(pid) if process.alive(pid) else []
    ctrl = f"path={ctrl_socket(run_vm_dir)},"
    if args and Path(args[0]).name == SWTPM and any(ctrl in a for a in args):
        return pid
    return None


def _last_line(*paths: Path) -> str | None:
    for p in paths:
        with contextlib.suppress(OSError):
            lines = [ln for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1]
    return None


async def start(
    vm: str,
    state_dir: Path,
    run_vm_dir: Path,
    before_exec: Callable[[], None] | None = None,
    timeout: float = START_TIMEOUT,
    binary: str = SWTPM,
) -> int:
    """Start the VM's swtpm and wait until its control socket is there; its pid. On failure nothing runs."""
    if not state_dir.is_dir():
        raise QemuStartError(f"the TPM state of VM {vm!r} is missing: {state_dir}")
    ctrl = ctrl_socket(run_vm_dir)
    ctrl.unlink(missing_ok=True)
    with (run_vm_dir / OUTPUT).open("wb") as out:
        try:
            proc = subprocess.Popen(
                swtpm_argv(state_dir, run_vm_dir, binary), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, close_fds=True, preexec_fn=before_exec,
            )  # fmt: skip
        except FileNotFoundError:
            raise QemuStartError(f"{binary} is not installed on this host (apt-get install swtpm)") from None
        except (PermissionError, subprocess.SubprocessError) as e:
            raise QemuStartError(f"cannot start swtpm for VM {vm!r}: {e}") from None
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    (run_vm_dir / PIDFILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while not ctrl.is_socket():
        if proc.poll() is not None or not process.alive(proc.pid):
            why = _last_line(run_vm_dir / OUTPUT, run_vm_dir / LOG) or f"exit status {proc.returncode}"
            (run_vm_dir / PIDFILE).unlink(missing_ok=True)
            raise QemuStartError(f"swtpm refused to start for VM {vm!r}: {why}")
        if time.monotonic() > deadline:
            await process.kill_hard(proc.pid, STOP_TIMEOUT)
            (run_vm_dir / PIDFILE).unlink(missing_ok=True)
            raise QemuStartError(f"swtpm for VM {vm!r} did not start within {timeout:.0f} s")
        await asyncio.sleep(0.01)
    return proc.pid


def end(run_vm_dir: Path) -> None:
    """SIGKILL the VM's swtpm if one still runs (its QEMU is gone); never waits."""
    pid = pid_of(run_vm_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    (run_vm_dir / PIDFILE).unlink(missing_ok=True)


async def stop(run_vm_dir: Path, timeout: float = STOP_TIMEOUT) -> None:
    """End the VM's swtpm and wait (bounded) until it is gone; nothing happens if none runs."""
    pid = pid_of(run_vm_dir)
    if pid is not None and not await process.kill_hard(pid, timeout):
        raise HypervisorError(f"the swtpm process {pid} will not end")
    (run_vm_dir / PIDFILE).unlink(missing_ok=True)
