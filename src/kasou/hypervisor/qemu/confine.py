"""Confine each VM's QEMU as libvirt and Proxmox do: a user of its own, a sandbox, a cgroup, its own files only.

With ``KASOU_CONFINE=1`` (off by default for now; :class:`kasou.config.ConfineSettings`):

* **A user per VM.** QEMU runs as uid = gid = ``KASOU_VM_UID_BASE + slot`` (numeric, no
  /etc/passwd entry, no supplementary group but the one of /dev/kvm under KVM). The slot is
  the lowest one no other runtime directory of this host records; the VM keeps it in
  ``confine.json`` of its runtime directory, so a restarted agent knows it.
* **Its own files only.** The VM's disks, mirror copies, snapshot overlays, backup targets
  (while the backup runs) and incoming migration disks are handed to its uid (0600), and
  so is the per-VM directory that holds them (``<pool>/<vm>/``, 0700) when it is named
  after the VM. A disk's backing file elsewhere (a template's disk under a linked clone) is
  made readable (0644), never writable. The directories above get search permission for
  others (``o+x``: enter, never list). The runtime directory is root's with the VM's group,
  mode 1770: QEMU makes its sockets and logs there, but cannot replace the agent's records
  (pid, launch spec, exit record; the sticky bit). The serial log is the VM's file.
  TLS credentials for migration and NBD are a copy in the runtime directory, the VM's alone.
* **Taps** are opened by the agent and handed to QEMU as descriptors (``-netdev tap,fd=N``), as
  libvirt does: /dev/net/tun may be root's alone.
* **A sandbox.** ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny``:
  QEMU cannot fork, exec, change user or priorities (so a memory snapshot is written through
  a file descriptor the agent opens, never through ``exec:``).
* **A cgroup.** cgroup v2 (``/sys/fs/cgroup/kasou/vm-<name>.<host tag>``: ``memory.max``, ``cpu.weight``,
  ``io.weight``) where the root lists those controllers, else the v1 hierarchies (memory,
  cpu, blkio) that are mounted. QEMU enters it before it runs (the child writes itself into
  ``cgroup.procs`` before it drops root and execs QEMU); it is removed when QEMU ends, and
  leftovers are removed when the agent starts.

A ``qemu-storage-daemon`` serving a replica stays root's: it holds no guest and parses
only the NBD protocol from the peer host's QEMU over TLS.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.config import ConfineSettings
from kasou.errors import HypervisorError

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
RECORD = "confine.json"
TLS_DIR = "tls"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "kasou"
V1_CONTROLLERS = ("memory", "cpu", "blkio")


@dataclass(frozen=True)
class Identity:
    """The unprivileged user one VM's QEMU runs as on this host."""

    slot: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def sandbox_args() -> list[str]:
    return ["-sandbox", SANDBOX]


# -- slots ------------------------------------------------------------------------------------


def read_identity(run_vm_dir: Path) -> Identity | None:
    """The identity a VM's runtime directory records (None: QEMU ran unconfined, or no record)."""
    try:
        data = json.loads((run_vm_dir / RECORD).read_text())
        return Identity(int(data["slot"]), int(data["uid"]), int(data["gid"]), tuple(data.get("groups", [])))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def choose_identity(settings: ConfineSettings, run_dir: Path, name: str, accelerator: str) -> Identity:
    """The VM's slot: the one it had (its record), else the lowest one no other VM's record holds."""
    own = read_identity(run_dir / name)
    taken = set()
    for d in run_dir.iterdir() if run_dir.exists() else []:
        ident = read_identity(d)
        if ident is not None and d.name != name:
            taken.add(ident.slot)
    slot = own.slot if own is not None and own.slot not in taken and own.slot < settings.slots else None
    if slot is None:
        slot = next((s for s in range(settings.slots) if s not in taken), None)
    if slot is None:
        raise HypervisorError(
            f"no free VM user on this host for VM {name!r}: all {settings.slots} "
            f"(KASOU_VM_UID_COUNT from KASOU_VM_UID_BASE={settings.uid_base}) are taken"
        )
    groups: tuple[int, ...] = ()
    if accelerator == "kvm":
        with contextlib.suppress(OSError):
            groups = (os.stat("/dev/kvm").st_gid,)
    uid = settings.uid_base + slot
    return Identity(slot, uid, uid, groups)


def save_identity(run_vm_dir: Path, ident: Identity) -> None:
    (run_vm_dir / RECORD).write_text(
        json.dumps({"slot": ident.slot, "uid": ident.uid, "gid": ident.gid, "groups": list(ident.groups)})
    )


# -- files ------------------------------------------------------------------------------------


def searchable(path: Path) -> None:
    """Let others enter (never list) every directory above ``path``."""
    for d in path.parents:
        with contextlib.suppress(OSError):
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)


def _own(path: Path, ident: Identity, mode: int) -> None:
    os.chown(path, ident.uid, ident.gid, follow_symlinks=False)
    os.chmod(path, mode)


def backing_of(path: Path) -> Path | None:
    """The backing file a qcow2 image names (relative names are taken from its directory), or None."""
    try:
        with path.open("rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not size or size > 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode(errors="replace")
    except OSError:
        return None
    if name.startswith(("json:", "nbd:")) or "://" in name:
        return None
    p = Path(name)
    return p if p.is_absolute() else path.parent / p


def _readable(path: Path) -> None:
    """A file several VMs read (a template's disk, a read-only image): readable, its directory enterable."""
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | 0o444)
    with contextlib.suppress(OSError):
        os.chmod(path.parent, stat.S_IMODE(path.parent.stat().st_mode) | stat.S_IXOTH)


def hand_over_disk(path: str | Path, ident: Identity, vm: str, readonly: bool = False) -> None:
    """Give a disk file (and its chain) to the VM's user: the file and its per-VM directory are its
    own; backing files outside that directory become readable only; the directories above searchable.
    A read-only disk (an installation image several VMs may share) is made readable, never given away."""
    p = Path(path)
    if not p.exists():
        return
    home = p.parent
    searchable(p)
    if readonly:
        _readable(p)
    else:
        _own(p, ident, 0o600)
    if home.name == vm:
        _own(home, ident, 0o700)
    seen = {p.resolve()}
    chain = backing_of(p)
    while chain is not None and chain.exists() and chain.resolve() not in seen:
        seen.add(chain.resolve())
        searchable(chain)
        if chain.parent.resolve() == home.resolve() and not readonly:
            _own(chain, ident, 0o600)
        else:
            _readable(chain)
        chain = backing_of(chain)


def give_back(path: str | Path) -> None:
    """A file the VM no longer needs (a finished backup's target) becomes root's again."""
    with contextlib.suppress(OSError):
        os.chown(path, 0, 0, follow_symlinks=False)


def files_in(arguments: Any) -> Iterator[str]:
    """The file names a ``blockdev-add`` opens (every ``{"driver": "file", "filename": ...}`` in it)."""
    if isinstance(arguments, dict):
        if arguments.get("driver") == "file" and isinstance(arguments.get("filename"), str):
            yield arguments["filename"]
        for v in arguments.values():
            yield from files_in(v)
    elif isinstance(arguments, list):
        for v in arguments:
            yield from files_in(v)


def prepare_runtime(run_vm_dir: Path, serial_log: Path, ident: Identity) -> None:
    """The runtime directory: root's, the VM's group may add files (1770); the serial log the VM's."""
    searchable(run_vm_dir / "x")
    os.chown(run_vm_dir, 0, ident.gid)
    os.chmod(run_vm_dir, 0o1770)
    searchable(serial_log)
    serial_log.touch()
    _own(serial_log, ident, 0o600)


def copy_tls(source: Path, run_vm_dir: Path, ident: Identity) -> Path:
    """A copy of QEMU's TLS credentials that only this VM's user reads (0500 / 0400)."""
    dest = run_vm_dir / TLS_DIR
    if dest.is_dir():
        return dest
    tmp = run_vm_dir / (TLS_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    for f in source.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)
            _own(tmp / f.name, ident, 0o400)
    _own(tmp, ident, 0o500)
    tmp.rename(dest)
    return dest


# -- taps -------------------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def open_taps(argv: list[str]) -> tuple[list[str], list[int]]:
    """Open each tap QEMU would open by name (``-netdev tap,...,ifname=T``) and name the descriptor instead
    (``fd=N``): the agent attaches to the tap as root, so QEMU needs neither ``/dev/net/tun`` (root's
    alone on some hosts) nor ``CAP_NET_ADMIN``, as libvirt does. The caller passes the descriptors to
    QEMU and closes its own copies; on failure none is left open."""
    out: list[str] = []
    fds: list[int] = []
    try:
        for arg in argv:
            if arg.startswith("tap,") and ",ifname=" in arg:
                opts = arg.split(",")
                name = next(o.removeprefix("ifname=") for o in opts if o.startswith("ifname="))
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                fds.append(fd)
                ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
                fcntl.ioctl(fd, TUNSETIFF, ifr)
                kept = [o for o in opts if not o.startswith(("ifname=", "script=", "downscript="))]
                arg = ",".join([*kept, f"fd={fd}"])
            out.append(arg)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise HypervisorError(f"cannot open a tap for QEMU: {e.strerror}") from None
    return out, fds


# -- cgroups ----------------------------------------------------------------------------------


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


def cgroup_v2(root: Path = CGROUP_ROOT) -> bool:
    """Is ``root`` a cgroup v2 hierarchy offering memory, cpu and io?"""
    try:
        have = set((root / "cgroup.controllers").read_text().split())
    except OSError:
        return False
    return {"memory", "cpu", "io"} <= have


@dataclass(frozen=True)
class Cgroup:
    """One VM's cgroup directories (one on v2, one per controller on v1)."""

    dirs: tuple[Path, ...]

    def enter(self) -> None:
        """Put the calling process in the cgroup (run in the child, before QEMU)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        """Remove the directories; a QEMU that just ended may hold one for a moment (until it is reaped)."""
        for d in self.dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def weight(vcpus: int) -> int:
    """CPU and I/O weight: 100 per vCPU (cgroup v2's default weight is 100), at most 10000."""
    return max(1, min(10000, 100 * vcpus))


def host_tag(run_dir: Path) -> str:
    """Tells apart the cgroups of two agents on one machine (a lab's hosts): a digest of the runtime directory."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:6]


def cgroups_visible(root: Path = CGROUP_ROOT) -> bool:
    """Does this process see a cgroup file system (v2, or a v1 memory hierarchy)?

    A process started by ``ip netns exec`` gets a fresh /sys without the cgroup mounts (``kasou lab`` starts
    its hosts' services so that they keep them: :func:`kasou.lab.net.in_netns`).
    """
    return (root / "cgroup.controllers").exists() or (root / "memory" / "cgroup.procs").exists()


def make_cgroup(name: str, tag: str, memory_bytes: int, vcpus: int, root: Path = CGROUP_ROOT) -> Cgroup:
    """Make the VM's cgroup with its limits; HypervisorError if this host has no usable cgroup."""
    leaf = f"vm-{name}.{tag}"
    if cgroup_v2(root):
        parent = root / CGROUP_PARENT
        parent.mkdir(exist_ok=True)
        _write(root / "cgroup.subtree_control", "+memory +cpu +io")
        _write(parent / "cgroup.subtree_control", "+memory +cpu +io")
        d = parent / leaf
        d.mkdir(exist_ok=True)
        if not _write(d / "memory.max", str(memory_bytes)):
            d.rmdir()
            raise HypervisorError(f"cannot set the memory limit of VM {name!r} in {d}")
        _write(d / "cpu.weight", str(weight(vcpus)))
        _write(d / "io.weight", f"default {weight(vcpus)}")
        return Cgroup((d,))
    dirs = []
    for ctrl in V1_CONTROLLERS:
        base = root / ctrl
        if not (base / "cgroup.procs").exists():
            continue
        d = base / CGROUP_PARENT / leaf
        d.mkdir(parents=True, exist_ok=True)
        dirs.append(d)
        if ctrl == "memory" and not _write(d / "memory.limit_in_bytes", str(memory_bytes)):
            Cgroup(tuple(dirs)).remove()
            raise HypervisorError(f"cannot set the memory limit of VM {name!r} in {d}")
        if ctrl == "cpu":
            _write(d / "cpu.shares", str(weight(vcpus) * 1024 // 100))
        if ctrl == "blkio":
            _write(d / "blkio.weight", str(max(10, min(1000, weight(vcpus)))))
    if not any(d.parent.parent.name == "memory" for d in dirs):
        Cgroup(tuple(dirs)).remove()
        raise HypervisorError(f"this host has no memory cgroup for VM {name!r} (cgroup v2 or v1 memory)")
    return Cgroup(tuple(dirs))


def cgroup_of(name: str, tag: str, root: Path = CGROUP_ROOT) -> Cgroup:
    """The VM's cgroup directories as they are named (whether they exist or not)."""
    leaf = f"vm-{name}.{tag}"
    if cgroup_v2(root):
        return Cgroup((root / CGROUP_PARENT / leaf,))
    return Cgroup(tuple(root / c / CGROUP_PARENT / leaf for c in V1_CONTROLLERS))


def remove_leftovers(keep: set[str], tag: str, root: Path = CGROUP_ROOT) -> None:
    """Remove the cgroups of VMs that no longer run here (an agent start); an empty one only."""
    parents = [root / CGROUP_PARENT] if cgroup_v2(root) else [root / c / CGROUP_PARENT for c in V1_CONTROLLERS]
    for parent in parents:
        for d in parent.glob(f"vm-*.{tag}") if parent.is_dir() else []:
            if d.name.removeprefix("vm-").removesuffix(f".{tag}") not in keep:
                with contextlib.suppress(OSError):
                    d.rmdir()


def remove_all(tag: str, timeout: float = 5.0, root: Path = CGROUP_ROOT) -> list[Path]:
    """Remove every VM cgroup of ``tag``, whose QEMUs all ended (a lab taken down, a test's agent). A QEMU still
    exiting holds its cgroup for a moment: tried again until ``timeout``. Returns the directories left."""
    parents = [root / CGROUP_PARENT] if cgroup_v2(root) else [root / c / CGROUP_PARENT for c in V1_CONTROLLERS]
    deadline = time.monotonic() + timeout
    while True:
        remove_leftovers(set(), tag, root)
        left = [d for p in parents if p.is_dir() for d in p.glob(f"vm-*.{tag}")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def child_setup(ident: Identity, cgroup: Cgroup | None) -> Callable[[], None]:
    """What the child does before it execs QEMU: enter the cgroup (as root), then become the VM's user."""

    def setup() -> None:
        if cgroup is not None:
            cgroup.enter()
        os.setgroups(list(ident.groups))
        os.setresgid(ident.gid, ident.gid, ident.gid)
        os.setresuid(ident.uid, ident.uid, ident.uid)

    return setup
