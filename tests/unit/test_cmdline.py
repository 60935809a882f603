from __future__ import annotations

from pathlib import Path

import pytest

from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from kasou.hypervisor.qemu.cmdline import BootFiles, RuntimeFiles, build_argv
from kasou.hypervisor.qemu.network import tap_name
from kasou.model.spec import NicSpec


def spec(**kw: object) -> LaunchSpec:
    base = dict(
        name="emr1",
        uuid="00000000-0000-0000-0000-000000000001",
        vcpus=2,
        memory_mib=256,
        image="tiny",
        disks=[LaunchDisk(id="disk0", path="/d/emr1/disk0.qcow2")],
        nics=[NicSpec(id="net0", mac="52:54:00:aa:bb:cc")],
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


FILES = RuntimeFiles(dir=Path("/run/k/emr1"), serial_log=Path("/log/emr1.log"))
BOOT = BootFiles(Path("/img/vmlinuz"), Path("/img/initrd"), "console=ttyS0 quiet")


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_basic_shape() -> None:
    argv = build_argv(spec(), FILES, "tcg", BOOT)
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-name") == ["guest=emr1,debug-threads=on"]
    assert opt(argv, "-accel") == ["tcg,tb-size=64"]
    assert opt(argv, "-m") == ["256"]
    assert opt(argv, "-smp") == ["2"]
    assert "-daemonize" not in argv  # the agent spawns QEMU itself (the sandbox forbids setsid)
    assert opt(argv, "-qmp") == ["unix:/run/k/emr1/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-vnc") == ["unix:/run/k/emr1/vnc.sock"]  # never a TCP port
    assert opt(argv, "-append") == ["console=ttyS0 quiet"]
    assert any("name=org.kasou.heartbeat" in a for a in opt(argv, "-device"))
    # the QEMU guest agent's channel, on every VM
    assert "socket,id=qga0,path=/run/k/emr1/qga.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0" in opt(argv, "-device")
    assert "-S" not in argv


def test_disks_and_nics() -> None:
    argv = build_argv(spec(), FILES, "kvm", BOOT)
    assert opt(argv, "-accel") == ["kvm"]
    bd = opt(argv, "-blockdev")
    assert bd[0].startswith("driver=file,filename=/d/emr1/disk0.qcow2,node-name=disk0-file")
    assert bd[1].startswith("driver=qcow2,file=disk0-file,node-name=disk0")
    assert "virtio-blk-pci,drive=disk0,id=disk0-dev" in opt(argv, "-device")
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,id=net0-dev" in opt(argv, "-device")


def test_commas_in_paths_are_escaped() -> None:
    argv = build_argv(spec(disks=[LaunchDisk(id="disk0", path="/d/a,b.qcow2")]), FILES, "tcg", BOOT)
    assert "filename=/d/a,,b.qcow2," in opt(argv, "-blockdev")[0]


def test_paused_and_extra_kernel_args_and_no_boot() -> None:
    argv = build_argv(spec(paused=True, kernel_args_extra="kasou.writer=0"), FILES, "tcg", BOOT)
    assert "-S" in argv
    assert opt(argv, "-append") == ["console=ttyS0 quiet kasou.writer=0"]
    assert "-kernel" not in build_argv(spec(), FILES, "tcg", None)


def test_unknown_accelerator() -> None:
    with pytest.raises(ValueError):
        build_argv(spec(), FILES, "hvf", BOOT)


def test_nic_on_a_network_is_a_prepared_tap() -> None:
    nics = [
        NicSpec(id="net0", mac="52:54:00:aa:bb:cc", network="clinical", vlan=10),
        NicSpec(id="net1", mac="52:54:00:aa:bb:cd"),
    ]
    argv = build_argv(spec(nics=nics), FILES, "tcg", BOOT)
    tap = tap_name("emr1", "net0")
    assert opt(argv, "-netdev") == [f"tap,id=net0,ifname={tap},script=no,downscript=no", "user,id=net1"]
    devices = opt(argv, "-device")
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,id=net0-dev" in devices
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:aa:bb:cd,id=net1-dev" in devices


def test_incoming_side_uses_the_same_tap_and_mac() -> None:
    nics = [NicSpec(id="net0", mac="52:54:00:aa:bb:cc", network="imaging", vlan=20)]
    here = build_argv(spec(nics=nics), FILES, "tcg", BOOT)
    there = build_argv(spec(nics=nics), FILES, "tcg", BOOT, incoming="defer")
    assert opt(here, "-netdev") == opt(there, "-netdev")
    assert opt(here, "-device") == opt(there, "-device")
    assert opt(there, "-incoming") == ["defer"]


def test_cpu_model_and_machine_type() -> None:
    from kasou.model.machine import pinned_machine, qemu_cpu

    files = RuntimeFiles(dir=Path("/run/x"), serial_log=Path("/log/x.log"))
    spec = LaunchSpec(name="a", uuid="00000000-0000-0000-0000-000000000001", vcpus=1, memory_mib=128,
                      cpu="x86-64-v2-AES", machine="pc-q35-7.2")  # fmt: skip
    argv = build_argv(spec, files, "tcg", None)
    assert argv[argv.index("-machine") + 1] == "pc-q35-7.2"
    cpu = argv[argv.index("-cpu") + 1]
    assert cpu.startswith("qemu64,") and {"+aes", "+sse4.2", "+popcnt", "+ssse3", "+cx16"} <= set(cpu.split(","))
    assert "+pclmulqdq" in cpu.split(",")  # with AES-NI always: Linux's AES-GCM needs it (an oops under TCG)
    assert "+avx2" in qemu_cpu("x86-64-v3") and "+aes" not in qemu_cpu("x86-64-v2")
    old = LaunchSpec(name="a", uuid="00000000-0000-0000-0000-000000000001", vcpus=1, memory_mib=128)
    argv = build_argv(old, files, "tcg", None)
    assert "-cpu" not in argv and argv[argv.index("-machine") + 1] == "q35"  # a VM made before: as it was
    assert pinned_machine("7.2.22") == "pc-q35-7.2" and pinned_machine("not installed") == "q35"


def test_hot_plug_ports_come_after_the_root_bus_devices_and_before_the_devices_on_them() -> None:
    """A VM's devices on the root bus keep their PCI addresses (its guest names NICs by them) whatever is added
    later; each port exists before the device plugged into it (also on a migration's destination)."""
    plain = opt(build_argv(spec(), FILES, "tcg", BOOT), "-device")
    assert not any(d.startswith("pcie-root-port") for d in plain)
    s = spec(
        pci_ports=3,
        disks=[LaunchDisk(id="disk0", path="/d/0.qcow2"), LaunchDisk(id="disk2", path="/d/2.qcow2", port=2),
               LaunchDisk(id="disk1", path="/d/1.qcow2")],
        nics=[NicSpec(id="net0", mac="52:54:00:aa:bb:cc"), NicSpec(id="net1", mac="52:54:00:aa:bb:cd", port=1)],
    )  # fmt: skip
    devices = opt(build_argv(s, FILES, "tcg", BOOT), "-device")
    ports = [d for d in devices if d.startswith("pcie-root-port")]
    assert ports == ["pcie-root-port,id=hp1,chassis=17", "pcie-root-port,id=hp2,chassis=18",
                     "pcie-root-port,id=hp3,chassis=19"]  # fmt: skip
    first_port = devices.index(ports[0])
    assert devices.index("virtio-blk-pci,drive=disk0,id=disk0-dev") < first_port
    assert devices.index("virtio-blk-pci,drive=disk1,id=disk1-dev") < first_port
    assert devices.index("virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,id=net0-dev") < first_port
    assert devices.index("virtio-blk-pci,drive=disk2,id=disk2-dev,bus=hp2") > devices.index(ports[-1])
    assert devices.index("virtio-net-pci,netdev=net1,mac=52:54:00:aa:bb:cd,id=net1-dev,bus=hp1") > first_port
    assert len(devices) == len(set(devices))
