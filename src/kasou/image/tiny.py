"""The ``tiny`` guest: a busybox initramfs on Debian's cloud kernel.

Everything comes from Debian packages (there are no image downloads on the
machines kasou runs on):

* the kernel: ``apt-get download`` of the exact package that
  ``linux-image-cloud-amd64`` depends on, unpacked with ``dpkg-deb -x``;
* the userland: ``/bin/busybox`` from ``busybox-static``;
* the data disk: an ext4 file system made with ``mke2fs -d``.

The guest's contract with the rest of kasou (the driver and the tests parse
these strings on the serial console ``ttyS0``; lines end in ``\r\n``)::

    recovered N      last complete integer line of /data/seq.log (0 if none)
    KASOU-READY      modules loaded, /data mounted, writer, heartbeat and power
                     button set up
    seq N            N was appended to /data/seq.log and fsync'd (after READY)
    KASOU-SHUTDOWN   the ACPI power button was pressed; powering off
    KASOU-ERROR ...  set-up failed (no disk, say); no KASOU-READY follows

The heartbeat goes to the virtio-serial port named ``org.kasou.heartbeat``:
one line ``hb UPTIME`` a second (the first line can be stale: it waited for a
host side to connect). Kernel arguments the guest reads: ``kasou.writer=0``
(no writer) and ``kasou.debug=1`` (``kasou-debug UPTIME STEP`` lines).

PID 1 is busybox ``init``; it runs the set-up script ``/etc/kasou/rc`` and then
keeps a shell on ``ttyS0`` (a prompt-less read-eval loop: one line is one
command) and a login shell on the VGA console ``tty1`` (keystrokes via VNC).

This module only builds files into a directory; caching, atomic replacement
and the manifest are the job of :mod:`kasou.image`.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kasou.errors import ImageError
from kasou.image.tools import Progress, one_line, run, write_file

NAME = "tiny"

#: The metapackage whose ``Depends:`` names the exact kernel package.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: What the driver passes with ``-append``. ``panic=-1`` resets at once on a
#: panic instead of hanging; ``quiet loglevel=3`` keeps kernel noise off the
#: serial console the contract lines are printed on. The rest only saves boot
#: time under TCG by skipping self-tests and tracing set-up a test guest does
#: not need: the crypto self-tests (about 0.4 s), the SP800-108 KDF self-test
#: and kprobe trace events (about 0.25 s together).
KERNEL_ARGS = (
    "console=ttyS0 quiet loglevel=3 panic=-1 cryptomgr.notests initcall_blacklist=crypto_kdf108_init,init_kprobe_trace"
)

DISK_SIZE_BYTES = 64 * 1024 * 1024
DISK_FORMAT = "raw"
DISK_MARKER = "KASOU-DISK"
HEARTBEAT_PORT = "org.kasou.heartbeat"

#: Modules the guest needs, in the order they are asked for. Dependencies
#: (from each module's ``depends=``) are added and ordered in code; anything
#: built into the kernel (``modules.builtin``) is skipped.
VIRTIO_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
)
#: ext4 and what it needs, asked for only when ext4 is not built in (it is in
#: Debian 12's cloud kernel). ``crc32c`` is a soft dependency by alias, so its
#: generic implementation is named explicitly; it is optional.
EXT4_MODULES: tuple[str, ...] = ("crc16", "mbcache", "jbd2", "crc32c_generic", "ext4")
#: The ACPI power button (``button``) and the event device it reports through
#: (both modules in Debian 12's cloud kernel).
POWER_BUTTON_MODULES: tuple[str, ...] = ("button", "evdev")
#: Skipped without error when the kernel has them neither built in nor as modules.
OPTIONAL_MODULES = frozenset({"crc32c_generic"})

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class KernelModule:
    """A module to load: its name, its uncompressed ``.ko`` and what it needs."""

    name: str
    data: bytes
    #: Hard dependencies that are modules too (built-in ones left out).
    depends: tuple[str, ...] = ()


@dataclass
class TinyBuild:
    """What :func:`build` produced, relative to the directory it built into."""

    kernel: str
    initrd: str
    disk: str
    disk_format: str
    disk_size_bytes: int
    kernel_args: str
    kernel_version: str
    packages: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Pure helpers (unit-tested without QEMU, apt or root)
# --------------------------------------------------------------------------


def module_name(filename: str) -> str:
    """The kernel's name for a module file: ``virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = os.path.basename(filename)
    for suffix in sorted(_MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_builtin(text: str) -> set[str]:
    """Names of the modules listed in a ``modules.builtin`` file."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def parse_apt_depends(text: str, prefix: str = "linux-image-") -> str:
    """The first ``Depends:`` package starting with ``prefix`` in ``apt-cache depends`` output."""
    for line in text.splitlines():
        match = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if match and match.group(1).startswith(prefix) and not match.group(1).startswith("<"):
            return match.group(1)
    raise ImageError(f"no '{prefix}*' dependency in 'apt-cache depends' output")


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an (uncompressed) ELF kernel module.

    This is what ``modinfo -F KEY`` prints, read directly so that the build
    does not need ``kmod`` (and ``busybox modinfo`` wants a ``modules.dep``).
    Returns each key with all its values, in order.
    """
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ImageError("not an ELF kernel module")
    elf_class, endian = data[4], data[5]
    order = "<" if endian == 1 else ">"
    try:
        if elf_class == 2:  # ELF64
            (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
            fmt, name_at, off_at = order + "IIQQQQ", 0, 4
        elif elf_class == 1:  # ELF32
            (shoff,) = struct.unpack_from(order + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)
            fmt, name_at, off_at = order + "IIIIII", 0, 4
        else:
            raise ImageError("unknown ELF class in kernel module")
        sections = []
        for index in range(shnum):
            fields = struct.unpack_from(fmt, data, shoff + index * shentsize)
            sections.append((fields[name_at], fields[off_at], fields[off_at + 1]))
        strtab = sections[shstrndx][1]
        for name_off, offset, size in sections:
            start = strtab + name_off
            name = data[start : data.index(b"\0", start)]
            if name == b".modinfo":
                info: dict[str, list[str]] = {}
                for entry in data[offset : offset + size].split(b"\0"):
                    key, sep, value = entry.decode("utf-8", "replace").partition("=")
                    if sep:
                        info.setdefault(key, []).append(value)
                return info
    except (struct.error, ValueError, IndexError) as exc:
        raise ImageError(f"malformed kernel module: {exc}") from exc
    raise ImageError("kernel module has no .modinfo section")


def module_depends(info: Mapping[str, Sequence[str]]) -> list[str]:
    """The hard dependencies (``modinfo -F depends``) from :func:`read_modinfo` output."""
    names: list[str] = []
    for value in info.get("depends", []):
        names.extend(n.strip().replace("-", "_") for n in value.split(",") if n.strip())
    return names


def dependency_order(
    wanted: Iterable[str],
    depends: Mapping[str, Sequence[str]],
    builtin: Iterable[str] = (),
) -> list[str]:
    """The ``insmod`` order: every module after all its dependencies.

    ``wanted`` is visited in order and each module's dependencies in the order
    ``depends`` lists them, so the result is deterministic and keeps the
    asked-for order wherever dependencies allow. Dependencies that are not in
    ``wanted`` are added; modules in ``builtin`` are left out (they need no
    ``insmod``). A module neither built in nor in ``depends`` or a cycle
    raises :class:`ImageError`.
    """
    builtin_set = {name.replace("-", "_") for name in builtin}
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin_set:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ImageError(f"kernel module dependency cycle: {cycle}")
        if name not in depends:
            needed_by = f" (needed by {visiting[-1]})" if visiting else ""
            raise ImageError(f"kernel module '{name}' not found in the kernel package{needed_by}")
        visiting.append(name)
        for dep in depends[name]:
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def render_rc(modules: Sequence[str], kernel_version: str) -> str:
    """The guest's set-up script (busybox sh), loading ``modules`` in that order."""
    return (
        _RC_TEMPLATE.replace("@MODULES@", " ".join(modules))
        .replace("@KVER@", kernel_version)
        .replace("@HEARTBEAT_PORT@", HEARTBEAT_PORT)
    )


def render_modules_dep(modules: Sequence[KernelModule], subdir: str = "kasou") -> str:
    """A ``modules.dep`` for ``modprobe``, from modules in load order.

    As with ``depmod``, each line lists all of a module's dependencies
    (transitively), the one to load first last.
    """
    by_name = {m.name: m for m in modules}
    position = {m.name: i for i, m in enumerate(modules)}
    lines = []
    for module in modules:
        needed: set[str] = set()
        stack = list(module.depends)
        while stack:
            dep = stack.pop()
            if dep in by_name and dep not in needed:
                needed.add(dep)
                stack.extend(by_name[dep].depends)
        deps = sorted(needed, key=lambda n: position[n], reverse=True)
        paths = " ".join(f"{subdir}/{d}.ko" for d in deps)
        lines.append(f"{subdir}/{module.name}.ko:{' ' + paths if paths else ''}\n")
    return "".join(lines)


# --------------------------------------------------------------------------
# The guest's files
# --------------------------------------------------------------------------

# PID 1 is busybox init (/init -> busybox): it reaps orphans, respawns the
# shells and, unlike a shell as PID 1, starts them with default signal
# handlers (a shell's background jobs ignore SIGINT, so ^C would not work).
# It runs the set-up script below to completion before starting the shells.
_INITTAB = """\
::sysinit:/etc/kasou/rc
ttyS0::respawn:/etc/kasou/serial-shell
tty1::respawn:-/bin/sh
"""

_RC_TEMPLATE = r"""#!/bin/sh
# kasou tiny guest: set-up, run once by init. Generated by kasou.image.tiny.
# Under TCG every fork+exec costs tens of milliseconds, so this script (and
# above all the writer, which runs ten times a second) uses shell builtins
# wherever it can: read instead of cat, read -t on a FIFO instead of sleep, a
# here-document instead of echo | dd.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TERM=linux
S=/dev/ttyS0
K=/run/kasou

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p $K
# pause SECONDS: nobody writes to the FIFO, so read -t just times out.
if mkfifo $K/tick && [ -p $K/tick ]; then
    exec 4<> $K/tick
    pause() { read -r -t "$1" _ <&4; }
else
    pause() { sleep "$1"; }
fi

# Contract lines go to ttyS0 itself (not /dev/console).
say() { echo "$*" > $S; }
fail() { say "KASOU-ERROR $*"; FAILED=1; }

WRITER=1
DEBUG=0
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        kasou.writer=0) WRITER=0 ;;
        kasou.debug=1) DEBUG=1 ;;
    esac
done
# kasou.debug=1: guest uptime at each step, on the serial console.
dbg() { [ $DEBUG = 1 ] && read -r up _ < /proc/uptime && say "kasou-debug $up $*"; }
dbg rc started

# has_virtio ID: is there a virtio device of that type (2 block, 3 console)?
has_virtio() {
    for f in /sys/bus/virtio/devices/*/device; do
        [ -e "$f" ] && read -r id < "$f" && [ "$id" = "$1" ] && return 0
    done
    return 1
}

# 1. Modules, in dependency order: one modprobe (modules.dep was written at
# build time), then insmod, in the order computed at build time, whatever is
# still missing.
modprobe -a @MODULES@ 2> /dev/null
for m in @MODULES@; do
    [ -d /sys/module/$m ] || insmod /lib/modules/@KVER@/kasou/$m.ko || fail "insmod $m failed"
done

# 5. ACPI power button -> graceful shutdown. Started first, so that a power
# button pressed while the rest boots is not lost (acpid reads the input
# event devices that exist when it starts: the button and evdev are loaded).
acpid -c /etc/acpi -a /etc/acpid.conf -l /run/acpid.log -p /run/acpid.pid \
    || fail "acpid did not start"
dbg modules loaded, acpid started

# /dev/vda appears a moment after virtio_blk binds: wait for it (bounded) if
# there is a virtio block device at all.
i=0
if has_virtio 0x0002; then
    while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do pause 0.1; i=$((i + 1)); done
fi
if [ ! -b /dev/vda ]; then
    fail "no disk: /dev/vda did not appear"
elif ! mount -t ext4 -o noatime /dev/vda /data; then
    fail "cannot mount /dev/vda on /data"
else
    # 2. The last complete line of seq.log: a crash can leave a partial last
    # line (no newline yet), which does not count.
    N=0
    if [ -s /data/seq.log ]; then
        nl='
'
        t=$(tail -c 256 /data/seq.log | tr '\000' ' '; echo x)
        t=${t%x}
        t=${t%"${t##*$nl}"}
        for w in $t; do
            case "$w" in *[!0-9]*) ;; *) N=$w ;; esac
        done
        N=${N#"${N%%[!0]*}"}
        N=${N:-0}
    fi
    dbg mounted
    say "recovered $N"

    # 3. The writer: "seq n" is printed only after dd's fsync returned.
    if [ "$WRITER" = 1 ]; then
        (
            i=0
            while [ ! -e $K/ready ] && [ $i -lt 100 ]; do pause 0.05; i=$((i + 1)); done
            n=$((N + 1))
            while [ ! -e $K/stop ]; do
                if dd of=/data/seq.log oflag=append conv=notrunc,fsync 2> /dev/null << EOF
$n
EOF
                then
                    echo "seq $n" > $S
                    n=$((n + 1))
                fi
                pause 0.1
            done
        ) &
        echo $! > $K/writer.pid
    fi
fi
dbg writer started

# 4. Heartbeat on the virtio-serial port named @HEARTBEAT_PORT@. Writes
# block while no host side is connected; that only blocks this subshell.
HB=
find_hb_port() {
    for d in /sys/class/virtio-ports/vport*; do
        [ -e "$d/name" ] && read -r name < "$d/name" && [ "$name" = @HEARTBEAT_PORT@ ] \
            && HB=/dev/${d##*/} && return 0
    done
    return 1
}
hb_loop() {
    while read -r up _ < /proc/uptime; do
        echo "hb $up" >&3 || return 1
        pause 1
    done
}
# Wait (bounded) for the port only if there is a virtio-serial device.
if has_virtio 0x0003; then
    i=0
    while ! find_hb_port && [ $i -lt 20 ]; do pause 0.1; i=$((i + 1)); done
fi
(
    while :; do
        find_hb_port && [ -c "$HB" ] && hb_loop 3> "$HB"
        pause 1
    done
) > /dev/null 2>&1 &
dbg heartbeat started

# 6. Ready.
if [ -z "$FAILED" ]; then
    say "KASOU-READY"
fi
: > $K/ready

# 7. The shells on ttyS0 and tty1 are started by init (see /etc/inittab).

# 8. Network, in the background, if there is a NIC.
if [ -e /sys/class/net/eth0 ]; then
    (
        ip link set lo up
        ip link set eth0 up
        exec udhcpc -f -i eth0 -s /etc/kasou/udhcpc.script -t 5 -T 2 -A 10
    ) > /dev/null 2>&1 &
fi
dbg done
"""

_SHUTDOWN_SCRIPT = r"""#!/bin/sh
# kasou tiny guest: the ACPI power button (run by acpid).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
K=/run/kasou
[ -e $K/shutting-down ] && exit 0
touch $K/shutting-down $K/stop
echo "KASOU-SHUTDOWN" > /dev/ttyS0
if [ -s $K/writer.pid ]; then
    pid=$(cat $K/writer.pid)
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 "$pid" 2>/dev/null
fi
sync
if grep -q ' /data ' /proc/mounts; then
    umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
fi
sync
poweroff -f
"""

# The serial console's shell is a read-eval loop: no prompt, no banner and no
# line editor (which would print a prompt and an ESC[6n query before every
# command and glue them to the contract lines). The tty echoes what is typed.
# One line is one command; ^C stops the running command.
_SERIAL_SHELL = r"""#!/bin/sh
cd /
trap : INT
while IFS= read -r line; do
    eval "$line"
done
"""

_PROFILE = """\
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
PS1='kasou:$PWD# '
"""

# busybox acpid: an input event matching the key in column 1 runs the path in
# column 2 (relative to the -c directory).
_ACPID_CONF = "PWRF power-button\n"

_UDHCPC_SCRIPT = r"""#!/bin/sh
# kasou tiny guest: udhcpc event handler.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip route del default 2>/dev/null
            for r in $router; do ip route add default via "$r" dev "$interface" && break; done
        fi
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
exit 0
"""


# --------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------


def kernel_package_name(cache_dir: Path) -> str:
    """The exact kernel package, e.g. ``linux-image-6.1.0-57-cloud-amd64``.

    Asks ``apt-cache depends``; without apt lists, falls back to the newest
    kernel package already in the download cache.
    """
    try:
        return parse_apt_depends(run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=120))
    except ImageError as exc:
        cached = sorted(cache_dir.glob("linux-image-*-cloud-amd64_*.deb"))
        if cached:
            return cached[-1].name.split("_", 1)[0]
        raise ImageError(f"cannot find the kernel package behind {KERNEL_META_PACKAGE}: {exc.message}") from exc


def download_package(package: str, cache_dir: Path) -> Path:
    """The ``.deb`` of ``package`` in ``cache_dir``, fetched with ``apt-get download`` if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    # Download beside the cache and move in, so that an interrupted download
    # is never mistaken for a cached package.
    partial = cache_dir / f".download-{package}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            cwd=partial,
            timeout=900,
        )
        debs = sorted(partial.glob(f"{package}_*.deb"))
        if not debs:
            raise ImageError(f"'apt-get download {package}' produced no .deb")
        target = cache_dir / debs[-1].name
        os.replace(debs[-1], target)
        return target
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=600)
    except ImageError:
        # A damaged cached package: drop it so that the next build downloads it again.
        deb.unlink(missing_ok=True)
        raise


def _read_module(path: Path) -> bytes:
    """The uncompressed bytes of a module (busybox insmod cannot load compressed ones)."""
    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if name.endswith(".ko.gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise ImageError(f"cannot decompress kernel module {name}: {exc}") from exc
    if name.endswith(".ko.zst"):
        try:
            proc = subprocess.run(["zstd", "-q", "-d", "-c", str(path)], capture_output=True, timeout=60, check=False)
        except FileNotFoundError as exc:
            raise ImageError("kernel modules are zstd-compressed: install 'zstd'") from exc
        if proc.returncode != 0:
            raise ImageError(f"cannot decompress kernel module {name}")
        return proc.stdout
    return data


def _kernel_tree(root: Path) -> tuple[Path, Path, str]:
    """``(vmlinuz, module directory, version)`` inside an unpacked kernel package."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError("the kernel package has no boot/vmlinuz-*")
    version = kernels[-1].name[len("vmlinuz-") :]
    for base in ("lib/modules", "usr/lib/modules"):
        moddir = root / base / version
        if moddir.is_dir():
            return kernels[-1], moddir, version
    raise ImageError(f"the kernel package has no modules for {version}")


def wanted_modules(builtin: set[str]) -> list[str]:
    """The modules to ask for, given what is built into the kernel."""
    ext4 = [] if "ext4" in builtin else list(EXT4_MODULES)
    return [*VIRTIO_MODULES, *ext4, *POWER_BUTTON_MODULES]


def collect_modules(moddir: Path) -> list[KernelModule]:
    """Every module to load, in load order."""
    builtin_file = moddir / "modules.builtin"
    builtin = parse_modules_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    files: dict[str, Path] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        if path.name.endswith(_MODULE_SUFFIXES):
            files.setdefault(module_name(path.name), path)
    wanted = [m for m in wanted_modules(builtin) if m in files or m not in OPTIONAL_MODULES]

    depends: dict[str, list[str]] = {}
    blobs: dict[str, bytes] = {}
    pending = [name for name in wanted if name not in builtin]
    while pending:
        name = pending.pop()
        if name in blobs or name in builtin or name not in files:
            continue  # dependency_order reports what is missing
        blob = _read_module(files[name])
        blobs[name] = blob
        depends[name] = module_depends(read_modinfo(blob))
        pending.extend(depends[name])
    order = dependency_order(wanted, depends, builtin)
    return [KernelModule(name, blobs[name], tuple(d for d in depends[name] if d not in builtin)) for name in order]


def _install_busybox(deb_root: Path, tree: Path) -> None:
    candidates = [deb_root / "bin/busybox", deb_root / "usr/bin/busybox"]
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        raise ImageError(f"{BUSYBOX_PACKAGE} has no busybox binary")
    (tree / "bin").mkdir(parents=True, exist_ok=True)
    target = tree / "bin/busybox"
    shutil.copy2(source, target)
    target.chmod(0o755)
    applets = run([str(target), "--list-full"], timeout=60).split()
    for applet in applets:
        rel = applet.strip("/")
        if not rel or rel == "bin/busybox" or ".." in rel.split("/"):
            continue
        link = tree / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    if not (tree / "bin/sh").is_symlink():
        raise ImageError("busybox has no 'sh' applet")


def _make_tree(tree: Path, busybox_root: Path, modules: Sequence[KernelModule], kernel_version: str) -> None:
    moddir = tree / "lib/modules" / kernel_version
    for d in ("dev", "proc", "sys", "run", "tmp", "data", "root", "etc/kasou"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    _install_busybox(busybox_root, tree)
    (moddir / "kasou").mkdir(parents=True)
    for module in modules:
        (moddir / "kasou" / f"{module.name}.ko").write_bytes(module.data)
    write_file(moddir / "modules.dep", render_modules_dep(modules))
    names = [m.name for m in modules]
    (tree / "init").symlink_to("/bin/busybox")
    write_file(tree / "etc/inittab", _INITTAB)
    write_file(tree / "etc/kasou/rc", render_rc(names, kernel_version), 0o755)
    write_file(tree / "etc/kasou/serial-shell", _SERIAL_SHELL, 0o755)
    write_file(tree / "etc/profile", _PROFILE)
    write_file(tree / "etc/acpid.conf", _ACPID_CONF)
    write_file(tree / "etc/acpi/power-button", _SHUTDOWN_SCRIPT, 0o755)
    write_file(tree / "etc/kasou/udhcpc.script", _UDHCPC_SCRIPT, 0o755)
    write_file(tree / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write_file(tree / "etc/group", "root:x:0:\n")
    write_file(tree / "etc/hostname", "kasou-tiny\n")


def _write_initramfs(tree: Path, out: Path) -> None:
    """``cpio -o -H newc | gzip`` of ``tree``, owned by root, in a stable order."""
    names = ["."]
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel = os.path.relpath(dirpath, tree)
        for entry in sorted(dirnames + filenames):
            names.append(entry if rel == "." else f"{rel}/{entry}")
    listing = "".join(f"{n}\0" for n in names).encode()
    raw = out.with_name(out.name + ".cpio")
    try:
        with raw.open("wb") as fh:
            try:
                proc = subprocess.run(
                    ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--null", "--reproducible"],
                    cwd=tree,
                    input=listing,
                    stdout=fh,
                    stderr=subprocess.PIPE,
                    timeout=300,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise ImageError("required tool 'cpio' is not installed (apt-get install cpio)") from exc
        if proc.returncode != 0:
            raise ImageError(f"'cpio -o' failed: {one_line(proc.stderr.decode(errors='replace'))}")
        with raw.open("rb") as src, gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        raw.unlink(missing_ok=True)


def _make_disk(disk: Path, scratch: Path) -> None:
    content = scratch / "disk-content"
    content.mkdir(parents=True)
    (content / DISK_MARKER).write_text(f"kasou image {NAME}\n")
    with disk.open("wb") as fh:
        fh.truncate(DISK_SIZE_BYTES)
    run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-L", "kasou-data",
            "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
            "-d", str(content), str(disk),
        ],
        timeout=300,
    )  # fmt: skip


def build(dest: Path, cache_dir: Path, progress: Progress) -> TinyBuild:
    """Build the tiny image's files into the (empty) directory ``dest``.

    Downloaded packages are kept in ``cache_dir``. Scratch files live under
    ``dest/.work`` and are removed before returning.
    """
    scratch = dest / ".work"
    scratch.mkdir(parents=True)
    try:
        progress("finding the kernel package", 0.02)
        kernel_pkg = kernel_package_name(cache_dir)
        progress(f"downloading {kernel_pkg}", 0.05)
        kernel_deb = download_package(kernel_pkg, cache_dir)
        progress(f"downloading {BUSYBOX_PACKAGE}", 0.25)
        busybox_deb = download_package(BUSYBOX_PACKAGE, cache_dir)

        progress("unpacking the kernel", 0.35)
        kroot = scratch / "kernel"
        _extract(kernel_deb, kroot)
        vmlinuz, moddir, version = _kernel_tree(kroot)
        shutil.copy2(vmlinuz, dest / "vmlinuz")

        progress("collecting kernel modules", 0.55)
        modules = collect_modules(moddir)
        shutil.rmtree(kroot)

        progress("unpacking busybox", 0.6)
        broot = scratch / "busybox"
        _extract(busybox_deb, broot)

        progress("writing the initramfs", 0.65)
        tree = scratch / "initramfs"
        _make_tree(tree, broot, modules, version)
        _write_initramfs(tree, dest / "initramfs.gz")

        progress("making the ext4 disk", 0.85)
        _make_disk(dest / "disk.raw", scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TinyBuild(
        kernel="vmlinuz",
        initrd="initramfs.gz",
        disk="disk.raw",
        disk_format=DISK_FORMAT,
        disk_size_bytes=DISK_SIZE_BYTES,
        kernel_args=KERNEL_ARGS,
        kernel_version=version,
        packages=[kernel_deb.name, busybox_deb.name],
        modules=[m.name for m in modules],
    )
