"""A throwaway Debian 12 machine with systemd as its PID 1, for installing kasou's package as an operator would.

This machine's own PID 1 is not systemd, so the package's units cannot be started here directly. Instead:

- ``mmdebstrap`` installs Debian 12 with systemd and the package's dependencies into a directory, from the
  host's own apt mirror; the host's package cache is lent to it (bind-mounted, so packages already
  downloaded are not fetched again, and nothing of the cache is deleted);
- systemd boots in it as PID 1 of new PID, mount, UTS, IPC, network and cgroup namespaces (what container
  managers do): its host name is kasou1, its network a loopback and a veth pair (10.250.0.2/24 on eth0), its
  cgroups a subtree of this machine's of its own, ``kasou-sdtest-<pid>``, mounted as the container's cgroup
  file systems;
- commands run in it with ``nsenter``.

Ending it kills its PID 1 (the kernel then kills every process of the PID namespace: systemd's, kasou's,
QEMU's), waits for them, removes its cgroups depth first and its root directory. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ADDRESS = "10.250.0.2"
HOSTNAME = "kasou1"
BUILD_TIMEOUT_S = 1200  # downloads what the host's cache lacks (qemu, etcd, ...) on a cold machine
BOOT_TIMEOUT_S = 120
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Inside the new namespaces, before systemd: move into the container's cgroups, then (in a cgroup namespace)
# mount what systemd expects, then become systemd. $1 the root, $2 the cgroup name, $3 the hierarchies.
BOOT_SCRIPT = r"""
set -eu
R=$1; CG=$2
for h in $3; do echo 0 > /sys/fs/cgroup/$h/$CG/cgroup.procs; done
hostname kasou1
ip link set lo up
ip link add eth0 type veth peer name eth0-peer  # (no dummy driver on every machine: a veth pair, both ends here)
ip link set eth0-peer up
ip addr add {address}/24 dev eth0
ip link set eth0 up
exec unshare --cgroup -- sh -eu -c '
R=$1; CG=$2
mount --bind $R $R
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t tmpfs -o mode=755 cgroup $R/sys/fs/cgroup
for h in $3; do
  mkdir -p $R/sys/fs/cgroup/$h
  mount --bind /sys/fs/cgroup/$h/$CG $R/sys/fs/cgroup/$h
done
mount -t tmpfs -o mode=755 run $R/run
mount -t tmpfs tmp $R/tmp
mount --rbind /dev $R/dev
cd $R
exec chroot . /usr/bin/env -i container=kasou-test TERM=dumb /lib/systemd/systemd --log-target=console
' boot "$R" "$CG" "$3"
""".replace("{address}", ADDRESS).replace("hostname kasou1", f"hostname {HOSTNAME}")


def hierarchies() -> list[str]:
    """The cgroup hierarchies mounted here (v1 controllers, name=systemd, the unified one)."""
    names = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, where, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2") and where.startswith(f"{CGROUP_ROOT}/"):
            names.append(where.removeprefix(f"{CGROUP_ROOT}/"))
    return names


def build_root(root: Path, deb: Path, sources: Path, log: Path) -> None:
    """Debian 12 with systemd and everything the package depends on and recommends (so that installing it needs
    no download), plus kasou's tiny guest image and the package in /root."""
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Recommends"], capture_output=True, text=True,
                            check=True, timeout=60).stdout  # fmt: skip
    wanted = ["systemd", "systemd-sysv", "dbus", "iproute2"]
    for item in fields.replace("\n", ",").replace("Depends:", "").replace("Recommends:", "").split(","):
        name = item.split("(")[0].split("|")[0].strip()
        if name and name not in wanted:
            wanted.append(name)
    cache = "/var/cache/apt/archives"
    argv = [
        "unshare", "--mount", "--propagation", "private", "--",
        "mmdebstrap", "--mode=root", "--variant=important", "--verbose",
        f"--include={','.join(wanted)}",
        '--aptopt=Acquire::Retries "3"',
        f'--setup-hook=mkdir -p "$1"{cache} && mount --bind {cache} "$1"{cache}',
        f'--customize-hook=umount "$1"{cache}',
        "--skip=essential/unlink",
        "--skip=download/empty",
        "bookworm", str(root), str(sources),
    ]  # fmt: skip
    with log.open("w") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 0, f"mmdebstrap failed ({r.returncode}): {log.read_text()[-3000:]}"
    # udev would act on this machine's devices (the container shares /dev): masked, as container managers do
    for unit in ("systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
                 "systemd-udev-trigger.service", "systemd-udev-settle.service"):  # fmt: skip
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (root / "etc/hostname").write_text(f"{HOSTNAME}\n")  # systemd sets it at boot (mmdebstrap copied this machine's)
    shutil.copy(deb, root / "root" / deb.name)


class Container:
    """systemd booted in ``root`` (see the module's text)."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.cgroup = f"kasou-sdtest-{os.getpid()}"
        self.hierarchies = hierarchies()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's, as this machine sees it

    def start(self) -> None:
        for h in self.hierarchies:
            d = CGROUP_ROOT / h / self.cgroup
            d.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset takes no process before these are set
                if (d / name).exists() and not (d / name).read_text().strip():
                    (d / name).write_text((d.parent / name).read_text())
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--propagation", "private", "--",
             "sh", "-c", BOOT_SCRIPT, "boot", str(self.root), self.cgroup, " ".join(self.hierarchies)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.pid:
            self.pid = self._systemd_pid()
            self._check_alive(deadline, "systemd to start")
        state = ""
        while state not in ("running", "degraded"):
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            self._check_alive(deadline, f"the boot to end (systemctl is-system-running: {state})")

    def _systemd_pid(self) -> int:
        assert self.proc is not None
        for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            try:
                exe = os.readlink(f"/proc/{child}/exe")
            except OSError:
                continue
            if exe.endswith("/systemd"):
                return int(child)
        return 0

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the container ended ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {BOOT_TIMEOUT_S} s waiting for {what}: "
                                 f"{self.log.read_text()[-2000:]}")  # fmt: skip
        time.sleep(0.2)

    def run(self, *argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command in the container, as root, with a login shell's PATH and nothing of this machine's
        environment."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--", "/usr/bin/env", "-i",
                            *(f"{k}={v}" for k, v in env.items()), *argv],
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed in the container ({r.returncode}):\n"
                                 f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")  # fmt: skip
        return r

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-n", "60", check=False).stdout

    def follow_journal(self, identifier: str, out: Path) -> subprocess.Popen[bytes]:
        """``journalctl -f -t IDENTIFIER`` into ``out`` (the journal is in the container's /run: gone with it). By
        the syslog identifier, not the unit: after the package's daemon-reload, a unit's ExecStop lines were not
        found by ``-u`` here."""
        env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--", "/usr/bin/env", "-i", *env,
                                 "journalctl", "-f", "-n", "0", "-o", "cat", "-t", identifier],
                                stdout=out.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip

    def end(self) -> None:
        """Kill everything in it (its PID 1 first), then remove its cgroups and its root."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self._log.close()
        deadline = time.monotonic() + 30
        for h in self.hierarchies:
            top = CGROUP_ROOT / h / self.cgroup
            while top.exists():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                try:
                    top.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"cgroup {top} still has processes after 30 s") from None
                    time.sleep(0.1)
        mounted = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
        assert not [m for m in mounted if m.startswith(str(self.root))], f"{self.root} still has mounts here"
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=True, timeout=300)
