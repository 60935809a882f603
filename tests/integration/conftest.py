"""Real kasou on real QEMU: each test gets its own KASOU_HOME, API port and services.

Every test ends every process it started, by pid (services, and any QEMU whose
command line names the test's home), and removes its files. A module whose tests use a lab
(the ``lab`` fixture, which runs ``kasou lab up``) first takes down a lab an earlier run left on
the machine (``end_leftover_labs``): a leftover is removed, never a reason to skip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kasou.config import DEFAULT_IMAGES, Paths
from kasou.hypervisor.qemu import confine
from kasou.lab import net
from kasou.lab.hosts import STATE_FILE, Lab, lab_dir

KASOU = [sys.executable, "-m", "kasou"]
LAB_PREFIX = "klab"  # the lab's bridges and links (klab0, klab-vm, klab-h1, klabv-h1) and namespaces (klab-h1)
LAB_BRIDGE_ADDRESS = "10.88.0.1"  # where a lab's etcd members listen


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" not in str(item.fspath):
            continue
        if "lab" in getattr(item, "fixturenames", ()):  # a lab runs etcd and boots QEMU guests
            item.add_marker(pytest.mark.etcd)
            item.add_marker(pytest.mark.qemu)
        elif item.get_closest_marker("etcd") is None:
            item.add_marker(pytest.mark.qemu)


# -- a lab left behind by an earlier run --------------------------------------------------------


def lab_leftovers() -> list[str]:
    """The lab links and namespaces on this machine (klab*, netns klab-*)."""
    namespaces = [n for n in net_namespaces() if n.startswith(f"{LAB_PREFIX}-")]
    return net.link_names(LAB_PREFIX) + [f"netns {n}" for n in namespaces]


def net_namespaces() -> list[str]:
    from pyroute2 import netns

    return sorted(netns.listnetns())


def _leftover_lab_dirs() -> list[Path]:
    """Directories whose recorded lab may be the one left behind: the default one, those the
    processes of the lab's namespaces and its etcd members name, and the test suite's own."""
    found: list[Path] = [lab_dir()]
    for ns in net_namespaces():
        if ns.startswith(f"{LAB_PREFIX}-"):
            for pid in net.pids_in_netns(ns):
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    for kv in env:
                        if kv.startswith(b"KASOU_TOKEN_FILE="):
                            found.append(Path(kv.split(b"=", 1)[1].decode(errors="replace")).parent)
    for _pid, args in command_lines():
        if args and os.path.basename(args[0]) == "etcd" and any(LAB_BRIDGE_ADDRESS in a for a in args):
            for flag, value in itertools.pairwise(args):
                if flag == "--data-dir":
                    found.append(Path(value).parent.parent)  # <lab>/etcd/<member>.etcd
    found += [p.parent for p in Path("/tmp").glob(f"kasou-*lab*/{STATE_FILE}")]
    found += [p.parent for p in Path("/tmp").glob(f"kasou-*lab*/lab/{STATE_FILE}")]
    return list(dict.fromkeys(d for d in found if (d / STATE_FILE).is_file()))


def end_leftover_labs() -> list[str]:
    """Take down a lab that an earlier run (a killed test, a developer's ``kasou lab up``) left on
    this machine, so that a new lab can start: ``kasou lab down`` (the lab's own teardown) in every
    directory that recorded one; then, for the links and namespaces no recorded lab claims, what
    that teardown does by hand: SIGKILL the processes in the namespaces and the lab's etcd members
    (by pid), delete the namespaces and the links. Returns what it did; fails if anything is left."""
    if not lab_leftovers():
        return []
    done = []
    for d in _leftover_lab_dirs():
        try:
            done += [f"lab down in {d}: {line}" for line in Lab(d).down()]
        except Exception as e:  # the next steps remove what this one could not
            done.append(f"lab down in {d} failed: {e}")
    pids = {pid for ns in net_namespaces() if ns.startswith(f"{LAB_PREFIX}-") for pid in net.pids_in_netns(ns)}
    pids |= {
        pid
        for pid, args in command_lines()
        if args and os.path.basename(args[0]) == "etcd" and any(LAB_BRIDGE_ADDRESS in a for a in args)
    }
    pids.discard(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pids:
        done.append(f"killed {len(pids)} stray lab processes: {sorted(pids)}")
    for ns in net_namespaces():
        if ns.startswith(f"{LAB_PREFIX}-") and net.remove_netns(ns):
            done.append(f"deleted netns {ns}")
    for link in net.link_names(LAB_PREFIX):
        if net.delete_link(link):
            done.append(f"deleted link {link}")
    left = lab_leftovers()
    assert not left, f"a lab left on this machine could not be taken down ({', '.join(left)}): {done}"
    return done


@pytest.fixture(scope="module", autouse=True)
def _no_leftover_lab(request: pytest.FixtureRequest) -> None:
    """Before a module that uses a lab: a lab left on the machine is taken down, not skipped for."""
    items = [i for i in request.session.items if i.module is request.module]
    if os.geteuid() == 0 and any("lab" in getattr(i, "fixturenames", ()) for i in items):
        for line in end_leftover_labs():
            print(f"leftover lab: {line}", file=sys.stderr)


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    if os.geteuid() != 0:
        pytest.skip("real-QEMU tests run as root")
    images = Path(os.environ.get("KASOU_IMAGES") or DEFAULT_IMAGES)
    r = subprocess.run([*KASOU, "image", "build", "tiny"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_lines() -> Iterator[tuple[int, list[str]]]:
    """Each process's pid and command line (read from /proc; those gone meanwhile are passed over)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        yield int(d.name), args


def qemu_pids_of(home: Path) -> list[int]:
    """QEMU processes (and their swtpm) started for this home (their command lines name its paths)."""
    paths = Paths.from_env(home)
    marks = (str(home), str(paths.vm_run))
    return [
        pid
        for pid, args in command_lines()
        if args
        and ("qemu-system" in args[0] or Path(args[0]).name == "swtpm")  # a VM's TPM ends with it
        and any(m in a for a in args for m in marks)
    ]


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@dataclass
class Kasou:
    """One kasou environment driven through its CLI, as a hospital's script would."""

    home: Path
    api: str
    env: dict[str, str] = field(default_factory=dict)
    pools: Path = Path("/nonexistent")  # its storage root (KASOU_STORAGE_ROOTS): pools go there, not in the home

    @property
    def paths(self) -> Paths:
        return Paths.from_env(self.home)

    def run(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*KASOU, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kasou {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def vm(self, name: str) -> dict[str, Any]:
        return dict(self.json("vm", "show", name))

    def wait_for(self, what: str, cond: Callable[[], Any], timeout: float = 90, every: float = 0.3) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def wait_ready(self, name: str, timeout: float = 90) -> dict[str, Any]:
        """``kasou vm wait NAME``: one process that polls the API (not a CLI process per poll)."""
        r = self.run("vm", "wait", name, "--timeout", f"{timeout:g}", "-o", "json", check=False, timeout=timeout + 60)
        if r.returncode != 0:
            raise AssertionError(f"waiting for {name}'s guest to be ready ({r.returncode}): {r.stderr.strip()}")
        return dict(json.loads(r.stdout))

    def log(self, name: str, tail: int = 1 << 20) -> str:
        """The end of the guest's console (a Debian boot prints tens of KiB before its writer's lines)."""
        return self.run("vm", "log", name, "--bytes", str(tail)).stdout

    def seqs(self, name: str) -> list[int]:
        return [int(ln.split()[1]) for ln in self.log(name).splitlines() if ln.startswith("seq ")]

    def service_pid(self, service: str) -> int:
        return int(self.paths.pidfile(service).read_text())


def remove_cgroups(run_dir: Path) -> None:
    """The cgroups of the VMs of the agent whose runtime directory is ``run_dir`` (their QEMUs ended): a QEMU
    killed, or its agent gone, leaves its cgroup; only that agent's next start would remove it."""
    for d in confine.remove_all(confine.host_tag(run_dir)):  # a QEMU the teardown could not end: it says so
        print(f"cgroup still in use after its QEMU was ended: {d}", file=sys.stderr)


OWNER_FILE = "test-owner.pid"  # in a kasou fixture's home: the pid of the pytest process that made it


def end_leftover_homes() -> list[str]:
    """The kasou services and QEMUs of fixtures' homes whose pytest process is gone (a run killed before its
    teardown): killed by pid, their homes removed. Homes of a pytest still running are left alone."""
    done = []
    for home in Path("/tmp").glob("kasou-t-*"):
        try:
            owner = int((home / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        pids = [*qemu_pids_of(home)]
        paths = Paths.from_env(home)
        for svc in ("api", "agent"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(paths.pidfile(svc).read_text())
                if pid_alive(pid) and str(home) in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"):
                    pids.append(pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(paths.vm_run, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        done.append(f"{home}: killed {pids}")
    return done


@pytest.fixture
def kasou(tiny_image: Path) -> Iterator[Kasou]:
    for line in end_leftover_homes():
        print(f"leftover kasou home: {line}", file=sys.stderr)
    home = Path(tempfile.mkdtemp(prefix="kasou-t-", dir="/tmp"))
    (home / OWNER_FILE).write_text(str(os.getpid()))
    pools = Path(tempfile.mkdtemp(prefix="kasou-pools-", dir="/tmp"))
    api = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, KASOU_HOME=str(home), KASOU_API=api, KASOU_IMAGES=str(tiny_image),
               KASOU_STORAGE_ROOTS=str(pools))  # fmt: skip
    env.pop("KASOU_TOKEN", None)
    k = Kasou(home, api, env, pools)
    try:
        k.run("up", timeout=120)
        yield k
    finally:
        subprocess.run([*KASOU, "down"], env=env, capture_output=True, timeout=60)
        for svc in ("api", "agent"):
            try:
                pid = int(k.paths.pidfile(svc).read_text())
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for pid in qemu_pids_of(home):
            os.kill(pid, signal.SIGKILL)
        for pid in qemu_pids_of(home):
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        remove_cgroups(k.paths.vm_run)
        shutil.rmtree(k.paths.vm_run, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(pools, ignore_errors=True)
