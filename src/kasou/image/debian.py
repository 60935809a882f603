"""The ``debian`` guest: Debian 12 (bookworm) with systemd, on a GPT disk that boots with BIOS or UEFI.

Everything comes from Debian's packages, fetched from the apt mirror the host is configured with
(``apt-cache policy`` names it): ``mmdebstrap`` installs the root file system into a directory,
and :mod:`kasou.image.disk` makes the disk from it without loop devices or mounts. The guest has:

* Debian's cloud kernel (signed), ``systemd``, ``dbus`` (so the ACPI power button shuts it down),
  ``systemd-networkd`` (DHCP on every NIC unless cloud-init says otherwise);
* GRUB for BIOS (``grub-pc-bin``: boot.img in the MBR, core.img in the BIOS boot partition) and,
  on the EFI system partition, Microsoft-signed ``shim`` and Debian-signed GRUB
  (``shim-signed``, ``grub-efi-amd64-signed``) for UEFI with Secure Boot, at the removable-media
  path (``EFI/BOOT/BOOTX64.EFI``) and at Debian's (``EFI/debian``);
* ``qemu-guest-agent``, ``cloud-init`` (NoCloud; it stays off on a boot without a seed disk);
* ``postgresql-15``, installed with its cluster made but the service disabled;
* kasou's guest contract: the service ``kasou-guest`` prints the same lines as the ``tiny``
  guest on the serial console ``ttyS0`` (see :mod:`kasou.image.tiny`), with three more first,
  and ``kasou-heartbeat`` writes ``hb UPTIME`` every second on the virtio-serial port
  ``org.kasou.heartbeat`` once systemd-logind runs (so a guest kasou sees as ready honours the
  ACPI power button)::

      firmware bios|uefi   how this guest was booted
      secureboot 0|1       the EFI variable SecureBoot (1: Secure Boot is enforcing)
      tpm 0|1              a TPM is there (/dev/tpm0 or /sys/class/tpm/*)
      recovered N          the last complete line of /var/lib/kasou/seq.log
      KASOU-READY          the writer starts
      seq N                N was appended to /var/lib/kasou/seq.log and fsync'd
      KASOU-SHUTDOWN       the guest is shutting down; the writer has stopped

The serial console carries no login prompt (``serial-getty@ttyS0`` is masked: its ``login:``
without a newline would glue itself to the next contract line), and no account has a password:
a NoCloud seed (cloud-init) gives users and keys.
Building needs root: ``mmdebstrap`` installs packages in a chroot and ``mke2fs -d`` must read
every file as its owner.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kasou.errors import ImageError
from kasou.image import disk as gpt
from kasou.image.tools import Progress, mounts_under, run, run_streaming, write_file

NAME = "debian"
SUITE = "bookworm"
DISK_SIZE_BYTES = 4 * 1024 * 1024 * 1024
DISK_FORMAT = "qcow2"
FIRMWARE = ("bios", "uefi", "uefi-secure")
HOSTNAME = "kasou-debian"
HEARTBEAT_PORT = "org.kasou.heartbeat"
#: The least memory it boots in comfortably (Debian's cloud kernel, systemd, under TCG).
MIN_MEMORY_MIB = 384
#: On the kernel command line besides ``root=``: the console on both the screen and ttyS0
#: (the last one is /dev/console, where systemd reports), and a quiet kernel, so that the
#: contract lines are not drowned.
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200 quiet"

PACKAGES: tuple[str, ...] = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "initramfs-tools",
    "grub2-common",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-efi-amd64-signed",
    "shim-signed",
    "mokutil",
    "qemu-guest-agent",
    "cloud-init",
    "postgresql-15",
)
#: Enabled, disabled and masked in the guest (``systemctl`` in the chroot).
ENABLE = ("kasou-guest.service", "kasou-heartbeat.service", "systemd-networkd.service", "systemd-resolved.service")
DISABLE = ("postgresql.service", "networking.service", "apt-daily.timer", "apt-daily-upgrade.timer")
MASK = ("serial-getty@ttyS0.service",)

#: How long mmdebstrap may take (downloading ~170 MB and installing ~260 packages).
MMDEBSTRAP_TIMEOUT_S = 2400
SECUREBOOT_VAR = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"  # EFI_GLOBAL_VARIABLE


@dataclass
class DebianBuild:
    """What :func:`build` produced, relative to the directory it built into."""

    disk: str
    disk_format: str
    disk_size_bytes: int
    kernel_version: str
    root_uuid: str
    build_seconds: float
    kernel: str | None = None
    initrd: str | None = None
    kernel_args: str = ""
    firmware: list[str] = field(default_factory=lambda: list(FIRMWARE))
    suite: str = SUITE
    min_memory_mib: int = MIN_MEMORY_MIB
    packages: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Pure helpers (unit-tested without apt, root or QEMU)
# --------------------------------------------------------------------------


def debian_sources(apt_policy: str, suite: str = SUITE) -> list[str]:
    """``deb`` lines for ``suite`` from the Debian archives in ``apt-cache policy`` output.

    The host's own mirrors are used (the only place packages may come from): each archive whose
    release says ``o=Debian``. An archive of the host's own release (a newer Debian, say) gives
    its address for ``suite``, ``suite-updates`` and (a security archive) ``suite-security``.
    """
    base: list[str] = []
    security: list[str] = []
    lines = apt_policy.splitlines()
    for here, release in itertools.pairwise(lines):
        m = re.match(r"\s*-?\d+\s+(\S+://\S+)\s+(\S+?)/\S+\s", here + " ")
        if not m or not re.search(r"\bo=Debian(,|$)", release.strip()):
            continue
        uri, dist = m.group(1).rstrip("/"), m.group(2)
        bucket = security if dist.endswith("-security") or "l=Debian-Security" in release else base
        if uri not in bucket:
            bucket.append(uri)
    if not base:
        raise ImageError(
            "apt knows no Debian archive to build the debian image from (none with o=Debian in "
            "'apt-cache policy'); add one to /etc/apt/sources.list and run apt-get update"
        )
    out = [f"deb {uri} {suite} main" for uri in base]
    out += [f"deb {uri} {suite}-updates main" for uri in base]
    out += [f"deb {uri} {suite}-security main" for uri in security]
    return out


def fat_volume_id(root_uuid: str) -> str:
    """The EFI partition's FAT volume id (8 hex digits), taken from the root file system's uuid."""
    return root_uuid.replace("-", "")[:8].upper()


def render_fstab(root_uuid: str, esp_id: str) -> str:
    return (
        "# kasou debian image: made at build time\n"
        f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
        f"UUID={esp_id[:4]}-{esp_id[4:]} /boot/efi vfat umask=0077,nofail 0 1\n"
    )


def render_grub_cfg(root_uuid: str, kernel_version: str) -> str:
    """``/boot/grub/grub.cfg``, read by GRUB for BIOS and for UEFI alike.

    Written as ``update-grub`` would write it; a kernel upgrade in the guest runs ``update-grub``,
    which writes it again from ``/etc/default/grub``.
    """
    return f"""\
# kasou debian image: made at build time; update-grub rewrites it from /etc/default/grub
set default=0
set timeout=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry 'Debian GNU/Linux 12 (kasou)' --id kasou-debian {{
    linux /boot/vmlinuz-{kernel_version} root=UUID={root_uuid} ro {KERNEL_CMDLINE}
    initrd /boot/initrd.img-{kernel_version}
}}
"""


def render_esp_grub_cfg(root_uuid: str) -> str:
    """The EFI partition's ``grub.cfg``: what signed GRUB reads first, pointing it at /boot/grub."""
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"


def render_core_cfg(root_uuid: str) -> str:
    """The configuration built into GRUB's core.img for BIOS: where the rest of GRUB is."""
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)'/boot/grub'\n"


_DEFAULT_GRUB = f"""\
# kasou debian image: what update-grub writes /boot/grub/grub.cfg from
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX="{KERNEL_CMDLINE.replace(" quiet", "")}"
GRUB_DISABLE_OS_PROBER=true
"""

# The guest's side of kasou's contract. dash, so every line is POSIX sh. The writer's loop is the
# same as the tiny guest's: "seq N" is printed only after dd's fsync returned.
_GUEST_SCRIPT = r"""#!/bin/sh
# kasou debian guest: the contract lines and the writer on ttyS0.
# Generated by kasou.image.debian; started by kasou-guest.service.
# The KASOU_* variables are for kasou's own tests of this script; systemd sets none of them.
S=${KASOU_CONSOLE:-/dev/ttyS0}
D=${KASOU_DATA:-/var/lib/kasou}
EFI=${KASOU_EFI:-/sys/firmware/efi}
TPMDEV=${KASOU_TPM_DEV:-/dev/tpm0}
TPMCLASS=${KASOU_TPM_CLASS:-/sys/class/tpm}
LOG=$D/seq.log
say() { echo "$*" >> "$S"; }  # >>: the same on a tty, and a file (in tests) keeps every line
mkdir -p "$D"

FW=bios
SB=0
if [ -d "$EFI" ]; then
    FW=uefi
    f=$EFI/efivars/@SECUREBOOT_VAR@
    [ -e "$f" ] || mount -t efivarfs efivarfs "$EFI/efivars" 2> /dev/null
    # 4 bytes of attributes, then the value: 1 when Secure Boot is enforcing.
    if [ -r "$f" ] && [ "$(od -An -tu1 -j4 -N1 "$f" | tr -d ' ')" = 1 ]; then SB=1; fi
fi
TPM=0
if [ -e "$TPMDEV" ] || [ -n "$(ls "$TPMCLASS" 2> /dev/null)" ]; then TPM=1; fi
say "firmware $FW"
say "secureboot $SB"
say "tpm $TPM"

# The last complete line of seq.log: a crash can leave a partial last line (no newline yet).
N=0
if [ -s "$LOG" ]; then
    nl='
'
    t=$(tail -c 256 "$LOG" | tr '\000' ' '; echo x)
    t=${t%x}
    t=${t%"${t##*$nl}"}
    for w in $t; do
        case "$w" in *[!0-9]*) ;; *) N=$w ;; esac
    done
    N=${N#"${N%%[!0]*}"}
    N=${N:-0}
fi
say "recovered $N"

STOP=
trap 'STOP=1' TERM INT
say "KASOU-READY"
WRITER=1
read -r cmdline < /proc/cmdline
for arg in $cmdline; do [ "$arg" = kasou.writer=0 ] && WRITER=0; done
n=$((N + 1))
while [ -z "$STOP" ]; do
    if [ $WRITER = 1 ] && echo $n | dd of="$LOG" oflag=append conv=notrunc,fsync status=none 2> /dev/null; then
        say "seq $n"
        n=$((n + 1))
    fi
    sleep 0.1 &
    wait $!
done
sync
say "KASOU-SHUTDOWN"
"""

# The heartbeat: "hb UPTIME" every second on the virtio-serial port, found by its name (its
# /dev/virtio-ports link comes from udev, which may not have run yet). A write blocks while no
# host side is connected; that blocks only this loop.
_HEARTBEAT_SCRIPT = r"""#!/bin/sh
# kasou debian guest: the heartbeat on virtio-serial. Generated by kasou.image.debian;
# started by kasou-heartbeat.service. (KASOU_* variables: for kasou's own tests only.)
PORTS=${KASOU_PORTS:-/sys/class/virtio-ports}
DEV=${KASOU_DEV:-/dev}
while :; do
    for d in "$PORTS"/vport*; do
        [ -e "$d/name" ] && read -r name < "$d/name" && [ "$name" = @HEARTBEAT_PORT@ ] \
            && [ -e "$DEV/${d##*/}" ] && {
                while read -r up _ < /proc/uptime; do
                    echo "hb $up" || break
                    sleep 1
                done > "$DEV/${d##*/}"
            }
    done
    sleep 1
done
"""

_GUEST_UNIT = """\
[Unit]
Description=kasou guest contract: readiness and the writer on ttyS0
# Early: it needs only the local file systems, so the first "seq" does not wait for the network,
# cloud-init or anything else; stopped before the file systems at shutdown.
DefaultDependencies=no
After=local-fs.target sys-firmware-efi-efivars.mount
Before=shutdown.target
Conflicts=shutdown.target

[Service]
Type=simple
ExecStart=/usr/lib/kasou/guest
# SIGTERM to the writer only: it finishes the write under way and says so.
KillMode=mixed
TimeoutStopSec=10

[Install]
WantedBy=sysinit.target
"""

# The heartbeat is what kasou's guest_ready comes from. It starts once systemd-logind runs,
# because logind is what turns the ACPI power button into a clean shutdown: a guest that is
# "ready" honours kasou vm shutdown (a press before logind listens would be lost).
_HEARTBEAT_UNIT = """\
[Unit]
Description=kasou heartbeat on virtio-serial (org.kasou.heartbeat)
After=systemd-logind.service kasou-guest.service

[Service]
Type=simple
ExecStart=/usr/lib/kasou/heartbeat

[Install]
WantedBy=multi-user.target
"""

# Waiting for the network (network-online.target) ends when one link is up, and after 30 s at
# most: a VM on a segment without DHCP must not hang the services that wait for it for minutes.
_WAIT_ONLINE = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
"""

_NETWORK = """\
# kasou debian image: DHCP on every NIC; a cloud-init seed's network config (10-cloud-init-*) comes first.
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

# cloud-init: only seed disks (NoCloud's "cidata", which kasou makes, and OpenStack's
# "config-2"); no metadata server is asked. Without a seed ds-identify turns cloud-init off for
# that boot, so a plain start costs nothing. (A list of one, or of one and None, would make
# ds-identify skip its search and run cloud-init on every boot, holding up sysinit.target until
# the network is online.) Network config from a seed is written for systemd-networkd.
_CLOUD_CFG = """\
# kasou debian image
datasource_list: [ NoCloud, ConfigDrive ]
system_info:
  network:
    renderers: [ networkd ]
"""


def render_guest_script() -> str:
    return _GUEST_SCRIPT.replace("@SECUREBOOT_VAR@", SECUREBOOT_VAR)


def render_heartbeat_script() -> str:
    return _HEARTBEAT_SCRIPT.replace("@HEARTBEAT_PORT@", HEARTBEAT_PORT)


def esp_files(rootfs: Path, root_uuid: str, scratch: Path) -> dict[str, Path]:
    """What goes on the EFI partition: shim at the removable path and at Debian's, with GRUB beside it.

    Without ``fbx64.efi`` beside it, shim at ``EFI/BOOT`` starts ``grubx64.efi`` at once instead
    of making boot entries and resetting.
    """
    shim = rootfs / "usr/lib/shim/shimx64.efi.signed"
    mok = rootfs / "usr/lib/shim/mmx64.efi.signed"
    grub = rootfs / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
    csv = rootfs / "usr/lib/shim/BOOTX64.CSV"
    for path in (shim, mok, grub):
        if not path.is_file():
            raise ImageError(f"the guest has no {path.relative_to(rootfs)} (shim-signed, grub-efi-amd64-signed)")
    cfg = scratch / "esp-grub.cfg"
    cfg.write_text(render_esp_grub_cfg(root_uuid))
    files = {
        "EFI/BOOT/BOOTX64.EFI": shim,
        "EFI/BOOT/grubx64.efi": grub,
        "EFI/BOOT/mmx64.efi": mok,
        "EFI/BOOT/grub.cfg": cfg,
        "EFI/debian/shimx64.efi": shim,
        "EFI/debian/grubx64.efi": grub,
        "EFI/debian/mmx64.efi": mok,
        "EFI/debian/grub.cfg": cfg,
    }
    if csv.is_file():
        files["EFI/debian/BOOTX64.CSV"] = csv
    return files


# --------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------


def _mmdebstrap(rootfs: Path, scratch: Path, cache: Path, progress: Progress) -> None:
    """Install the guest's packages into ``rootfs``, from the host's Debian mirror.

    mmdebstrap runs in a mount namespace of its own: the /proc, /sys and /dev it mounts in the
    chroot vanish with it, whatever way it ends, and are never left under a directory kasou
    removes. The packages it downloads are kept in ``cache`` for the next build (only those of
    the last build: older versions are dropped).
    """
    sources = scratch / "sources.list"
    sources.write_text("\n".join(debian_sources(run(["apt-cache", "policy"], timeout=120))) + "\n")
    fresh = cache.with_name(cache.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    fresh.mkdir()
    steps = {
        "I: running apt-get update": 0.04,
        "I: downloading packages": 0.06,
        "I: extracting archives": 0.2,
        "I: installing essential": 0.23,
        "I: installing remaining": 0.28,
        "I: running special hook: sync-out": 0.56,
        "I: cleaning package lists": 0.57,
    }
    set_up = 0

    def on_line(line: str) -> None:
        nonlocal set_up
        for start, fraction in steps.items():
            if line.startswith(start):
                progress(line[3:].rstrip(". "), fraction)
        if line.startswith("Setting up "):  # ~260 packages, most of them after "installing remaining"
            set_up += 1
            progress(f"installing packages ({set_up})", min(0.28 + 0.27 * set_up / 260, 0.55))

    for path in (cache, fresh):
        if " " in str(path):
            raise ImageError(f"the package cache {path} has a space in its path; set KASOU_IMAGES to one without")
    try:
        run_streaming(
            [
                "unshare", "--mount", "--propagation", "private", "--",
                "mmdebstrap", "--mode=root", "--variant=important", "--verbose",
                f"--include={','.join(PACKAGES)}",
                '--aptopt=Acquire::Retries "3"',
                '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
                f"--setup-hook=sync-in {cache} /var/cache/apt/archives/",
                f"--customize-hook=sync-out /var/cache/apt/archives {fresh}",
                "--skip=essential/unlink",
                SUITE, str(rootfs), str(sources),
            ],
            timeout=MMDEBSTRAP_TIMEOUT_S,
            on_line=on_line,
        )  # fmt: skip
    except ImageError:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    for stale in fresh.glob("partial"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(fresh, cache)


def _inside(rootfs: Path, rel: str) -> Path:
    """``rootfs/rel``, refusing a path that a symlink in the guest would lead out of the guest."""
    path = rootfs / rel
    real = os.path.realpath(path.parent)
    if real != os.path.realpath(rootfs) and not real.startswith(os.path.realpath(rootfs) + os.sep):
        raise ImageError(f"the guest's {rel} lies outside its root file system")
    if path.is_symlink():
        path.unlink()
    return path


def _kernel_version(rootfs: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels or not (rootfs / "boot" / f"initrd.img-{kernels[-1].name[8:]}").is_file():
        raise ImageError("the guest has no kernel and initramfs in /boot")
    return kernels[-1].name[len("vmlinuz-") :]


def _customize(rootfs: Path, root_uuid: str, esp_id: str, kernel_version: str) -> None:
    """The guest's own files: fstab, GRUB's configuration, networking, cloud-init, kasou's service."""
    files = {
        "etc/fstab": render_fstab(root_uuid, esp_id),
        "etc/hostname": f"{HOSTNAME}\n",
        "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost ip6-localhost ip6-loopback\n",
        "etc/default/grub": _DEFAULT_GRUB,
        "boot/grub/grub.cfg": render_grub_cfg(root_uuid, kernel_version),
        "etc/systemd/network/90-kasou-dhcp.network": _NETWORK,
        "etc/cloud/cloud.cfg.d/90-kasou.cfg": _CLOUD_CFG,
        "etc/systemd/system/kasou-guest.service": _GUEST_UNIT,
        "etc/systemd/system/kasou-heartbeat.service": _HEARTBEAT_UNIT,
        "etc/systemd/system/systemd-networkd-wait-online.service.d/kasou.conf": _WAIT_ONLINE,
        # Every clone gets its own machine id on its first boot.
        "etc/machine-id": "",
    }
    for rel, text in files.items():
        write_file(_inside(rootfs, rel), text)
    write_file(_inside(rootfs, "usr/lib/kasou/guest"), render_guest_script(), 0o755)
    write_file(_inside(rootfs, "usr/lib/kasou/heartbeat"), render_heartbeat_script(), 0o755)
    (rootfs / "boot/efi").mkdir(parents=True, exist_ok=True)
    dbus_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
        dbus_id.symlink_to("/etc/machine-id")
    run(["chroot", str(rootfs), "systemctl", "enable", "--quiet", *ENABLE], timeout=120)
    run(["chroot", str(rootfs), "systemctl", "disable", "--quiet", *DISABLE], timeout=120)
    run(["chroot", str(rootfs), "systemctl", "mask", "--quiet", *MASK], timeout=120)


def _bios_grub(rootfs: Path, root_uuid: str) -> tuple[bytes, bytes]:
    """GRUB for BIOS: its modules in /boot/grub/i386-pc (as grub-install puts them) and
    ``(boot.img, core.img)``, core.img made by the guest's own ``grub-mkimage``."""
    lib = rootfs / "usr/lib/grub/i386-pc"
    dest = rootfs / "boot/grub/i386-pc"
    dest.mkdir(parents=True, exist_ok=True)
    for f in lib.iterdir():
        if f.suffix in (".mod", ".lst", ".img", ".o"):
            shutil.copy2(f, dest / f.name)
    write_file(dest / "load.cfg", render_core_cfg(root_uuid))
    run(
        [
            "chroot", str(rootfs), "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc",
            "-o", "/boot/grub/i386-pc/core.img", "-c", "/boot/grub/i386-pc/load.cfg", "-p", "/boot/grub",
            "biosdisk", "part_gpt", "ext2", "search_fs_uuid",
        ],
        timeout=120,
    )  # fmt: skip
    return (lib / "boot.img").read_bytes(), (dest / "core.img").read_bytes()


def _package_versions(rootfs: Path) -> list[str]:
    out = run(["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"], timeout=120)
    wanted = {p for p in PACKAGES if not p.endswith("-cloud-amd64")} | {"systemd"}
    return sorted(
        " ".join(line.split()[:2])
        for line in out.splitlines()
        if line.split() and (line.split()[0] in wanted or line.startswith("linux-image-"))
    )


def _remove_tree(path: Path) -> None:
    """Remove a scratch tree, never descending into something mounted below it."""
    if not path.exists():
        return
    for point in mounts_under(path):
        run(["umount", "--lazy", point], timeout=60)
    if mounts_under(path):
        raise ImageError(f"{path} still has file systems mounted below it; not removing it")
    shutil.rmtree(path, ignore_errors=True)


def build(dest: Path, cache_dir: Path, progress: Progress) -> DebianBuild:
    """Build the debian image's disk into the (empty) directory ``dest``.

    Downloaded packages are kept in ``cache_dir/debian-debs``. Scratch files (the root file
    system, the raw disk) live under ``dest/.work`` and are removed before returning.
    """
    if os.geteuid() != 0:
        raise ImageError("building the debian image needs root (mmdebstrap installs packages in a chroot)")
    started = time.monotonic()
    scratch = dest / ".work"
    scratch.mkdir(parents=True)
    rootfs = scratch / "rootfs"
    try:
        progress(f"installing Debian {SUITE} with mmdebstrap", 0.02)
        _mmdebstrap(rootfs, scratch, cache_dir / "debian-debs", progress)

        progress("configuring the guest", 0.6)
        root_uuid = str(uuid.uuid4())
        esp_id = fat_volume_id(root_uuid)
        kernel_version = _kernel_version(rootfs)
        _customize(rootfs, root_uuid, esp_id, kernel_version)
        boot_img, core_img = _bios_grub(rootfs, root_uuid)
        packages = _package_versions(rootfs)

        progress("partitioning the disk", 0.65)
        raw = scratch / "disk.raw"
        layout = gpt.gpt_layout(DISK_SIZE_BYTES)
        gpt.partition_disk(raw, layout)
        progress("making the EFI system partition", 0.67)
        gpt.fill_esp(raw, layout.esp, esp_files(rootfs, root_uuid, scratch), volume_id=esp_id)
        progress("making the root file system", 0.7)
        gpt.make_root_fs(raw, layout.root, rootfs, uuid=root_uuid)
        _remove_tree(rootfs)
        progress("installing GRUB for BIOS", 0.85)
        gpt.install_bios_grub(raw, layout, boot_img, core_img)

        progress("writing the qcow2 disk", 0.88)
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(dest / "disk.qcow2")], timeout=1200)
    finally:
        _remove_tree(scratch)
    return DebianBuild(
        disk="disk.qcow2",
        disk_format=DISK_FORMAT,
        disk_size_bytes=DISK_SIZE_BYTES,
        kernel_version=kernel_version,
        root_uuid=root_uuid,
        build_seconds=round(time.monotonic() - started, 1),
        packages=packages,
    )
