"""Build the ``qemu-system-x86_64`` command line for a VM: pure functions, unit-tested.

Every VM gets: ``-name guest=NAME``, q35, its vCPUs and memory, virtio-blk
disks over ``-blockdev`` (node names ``<id>-file`` / ``<id>``), virtio-net
NICs (QEMU's user-mode NAT, or a tap the driver made beforehand on the network's
bridge), a VGA display on a VNC unix socket (never a TCP port), the serial console
on a unix socket with a log file, a virtio-serial port
``org.kasou.heartbeat`` for the guest's heartbeat, a virtio-serial port
``org.qemu.guest_agent.0`` for the QEMU guest agent (:mod:`kasou.hypervisor.qemu.qga`),
and QMP on a unix socket.
The destination of a live migration runs the very same command line plus
``-incoming defer -S`` (see :mod:`kasou.hypervisor.qemu.migration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu import firmware as fw
from kasou.hypervisor.qemu import seed, tpm
from kasou.hypervisor.qemu.hotplug import bus_of, root_port_args
from kasou.hypervisor.qemu.network import tap_name
from kasou.model.firmware import hyperv_cpu
from kasou.model.machine import DEFAULT_CPU, qemu_cpu
from kasou.model.media import boot_order
from kasou.model.spec import USER_NETWORK, NicSpec

HEARTBEAT_PORT = "org.kasou.heartbeat"
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"  # the name qemu-ga looks for (its udev rule makes /dev/virtio-ports/…)
#: A VM's CD drive: an ide-cd on the first port of q35's built-in AHCI controller (QEMU id and node name).
CDROM_DEVICE = "cd0-dev"
CDROM_NODE = "cd0"
CDROM_BUS = "ide.0"


@dataclass(frozen=True)
class RuntimeFiles:
    """The files of one running VM on its host (sockets, pid, logs)."""

    dir: Path
    serial_log: Path

    @property
    def serial_owner(self) -> Path:
        """Beside the serial log: the uuid of the VM that wrote it (the log outlives the run directory)."""
        return self.serial_log.with_name(self.serial_log.name + ".owner")

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.sock"

    @property
    def heartbeat(self) -> Path:
        return self.dir / "hb.sock"

    @property
    def guest_agent(self) -> Path:
        return self.dir / "qga.sock"

    @property
    def vnc(self) -> Path:
        return self.dir / "vnc.sock"

    @property
    def seed(self) -> Path:
        """The VM's cloud-init seed (kasou.hypervisor.qemu.seed), made at each start."""
        return self.dir / "seed.iso"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def output(self) -> Path:
        """QEMU's standard output and error (the reason it gives when it does not start)."""
        return self.dir / "qemu.out"

    @property
    def launch(self) -> Path:
        return self.dir / "launch.json"

    @property
    def exit(self) -> Path:
        return self.dir / "exit.json"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def migration(self) -> Path:
        """The state of a live migration in progress (either side), for an agent restart."""
        return self.dir / "migration.json"


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path
    kernel_args: str


def accel_args(accelerator: str) -> list[str]:
    """QEMU options for the accelerator. TCG keeps its code cache small (64 MiB)."""
    if accelerator == "kvm":
        return ["-accel", "kvm"]
    if accelerator == "tcg":
        # The default translation cache is sized from guest RAM and makes a
        # 128 MiB guest cost ~1 GiB resident; 64 MiB keeps it near 210 MiB.
        return ["-accel", "tcg,tb-size=64"]
    raise ValueError(f"unknown accelerator {accelerator!r}")


def build_argv(
    spec: LaunchSpec,
    files: RuntimeFiles,
    accelerator: str,
    boot: BootFiles | None,
    qemu_binary: str = "qemu-system-x86_64",
    incoming: str | None = None,
    firmware_code: Path | None = None,
    cdrom: Path | None = None,
) -> list[str]:
    """The full argv for one VM, with every channel on a unix socket (the agent spawns it: see spawn.py).

    ``incoming`` (e.g. ``"defer"``) makes it the paused destination of a live
    migration: ``-incoming`` and ``-S``, so the guest never runs here until told to.
    ``firmware_code``: OVMF's code image, for a UEFI VM (:mod:`kasou.hypervisor.qemu.firmware`).
    ``cdrom``: the ISO file in the VM's CD drive (``spec.cdrom`` is its image's name).
    """
    cpu = qemu_cpu(spec.cpu) if spec.cpu else None
    if spec.os == "windows":  # Hyper-V enlightenments: Windows runs far better with them (KVM)
        cpu = hyperv_cpu(cpu or qemu_cpu(DEFAULT_CPU), kvm=accelerator == "kvm")
    argv = [
        qemu_binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-uuid", spec.uuid,
        "-machine", fw.machine_value(spec.machine, spec.firmware),
        *(["-cpu", cpu] if cpu else []),
        *accel_args(accelerator),
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-vga", "std",
        "-vnc", f"unix:{files.vnc}",
        "-chardev",
        f"socket,id=serial0,path={files.serial},server=on,wait=off,logfile={files.serial_log},logappend=off",
        "-serial", "chardev:serial0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=hb0,path={files.heartbeat},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=hb0,name={HEARTBEAT_PORT}",
        "-chardev", f"socket,id=qga0,path={files.guest_agent},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}",
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
        "-D", str(files.qemu_log),
    ]  # fmt: skip
    if spec.nvram is not None:
        if firmware_code is None:
            raise ValueError(f"VM {spec.name!r} boots {spec.firmware}: give OVMF's code image")
        argv += fw.qemu_args(spec.firmware, firmware_code, spec.nvram)
    if spec.tpm_state is not None:
        argv += tpm.qemu_args(tpm.ctrl_socket(files.dir))
    if spec.os == "windows":
        argv += ["-rtc", "base=localtime"]  # Windows keeps the hardware clock in local time
    if boot is not None:
        append = boot.kernel_args
        if spec.kernel_args_extra:
            append = f"{append} {spec.kernel_args_extra}"
        argv += ["-kernel", str(boot.kernel), "-initrd", str(boot.initrd), "-append", append]
    if spec.cdrom is not None and cdrom is None:
        raise ValueError(f"VM {spec.name!r} has ISO image {spec.cdrom!r} in its CD drive: give its file")
    order = boot_order(spec.boot) if spec.cdrom_drive else []
    # Devices on the root bus first, in the order they always had (a guest names its NICs by PCI address),
    # then the empty hot-plug root ports, then the devices plugged into them (a device needs its port first).
    ports = root_port_args(spec.pci_ports)
    disks = [d for d in spec.disks if d.port is None] + [d for d in spec.disks if d.port is not None]
    nics = [n for n in spec.nics if n.port is None] + [n for n in spec.nics if n.port is not None]
    late = [a for d in disks if d.port is not None for a in _disk_args(d)]
    late += [a for n in nics if n.port is not None for a in _nic_args(spec.name, n)]
    for disk in disks:
        if disk.port is None:
            first = bool(spec.disks) and disk.id == spec.disks[0].id
            argv += _disk_args(disk, f",bootindex={order.index('disk')}" if order and first else "")
    if spec.cdrom_drive:
        argv += cdrom_args(cdrom if spec.cdrom is not None else None, order.index("cdrom"))
    if spec.cloud_init is not None:
        argv += seed.qemu_args(files.seed)
    for nic in nics:
        if nic.port is None:
            argv += _nic_args(spec.name, nic)
    argv += ports + late
    if incoming is not None:
        argv += ["-incoming", incoming]
    if spec.paused or incoming is not None:
        argv.append("-S")
    return argv


def cdrom_args(iso: Path | None, bootindex: int) -> list[str]:
    """The CD drive, empty or holding ``iso`` (read-only): QMP changes its medium later by its id."""
    device = f"ide-cd,bus={CDROM_BUS},id={CDROM_DEVICE},bootindex={bootindex}"
    if iso is None:
        return ["-device", device]
    return [
        "-blockdev", f"driver=file,filename={_opt(str(iso))},node-name={CDROM_NODE}-file,read-only=on",
        "-blockdev", f"driver=raw,file={CDROM_NODE}-file,node-name={CDROM_NODE},read-only=on",
        "-device", f"{device},drive={CDROM_NODE}",
    ]  # fmt: skip


def _disk_args(disk: LaunchDisk, extra: str = "") -> list[str]:
    ro = "on" if disk.readonly else "off"
    return [
        "-blockdev", f"driver=file,filename={_opt(disk.path)},node-name={disk.id}-file,read-only={ro}",
        "-blockdev", f"driver={disk.format},file={disk.id}-file,node-name={disk.id},read-only={ro}",
        # A mirrored disk pauses on an I/O error instead of failing the request: the driver then
        # switches it to its second copy and resumes (see kasou.hypervisor.qemu.mirrors).
        "-device", f"virtio-blk-pci,drive={disk.id},id={disk.id}-dev{bus_of(disk.port)}{extra}"
        + (",werror=stop,rerror=stop" if disk.mirror or disk.stop_on_error else ""),
    ]  # fmt: skip


def _nic_args(vm: str, nic: NicSpec) -> list[str]:
    if nic.network == USER_NETWORK:
        netdev = f"user,id={nic.id}"
    else:  # the tap exists already, on its network's bridge (see kasou.hypervisor.qemu.network)
        netdev = f"tap,id={nic.id},ifname={tap_name(vm, nic.id)},script=no,downscript=no"
    device = f"virtio-net-pci,netdev={nic.id},mac={nic.mac},id={nic.id}-dev{bus_of(nic.port)}"
    return ["-netdev", netdev, "-device", device]


def _opt(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax (',' is doubled)."""
    return value.replace(",", ",,")
