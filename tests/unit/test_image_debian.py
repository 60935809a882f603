"""The debian image's recipe without building it: the mirror it uses, its configuration, its guest script."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kasou.errors import ImageError
from kasou.image import debian

POLICY = """\
Package files:
 100 /var/lib/dpkg/status
     release a=now
 500 https://deb.nodesource.com/node_20.x nodistro/main amd64 Packages
     release o=. nodistro,n=nodistro,l=. nodistro,c=main,b=amd64
     origin deb.nodesource.com
 500 http://mirror.example.jp/debian-security bookworm-security/main amd64 Packages
     release v=12,o=Debian,a=oldstable-security,n=bookworm-security,l=Debian-Security,c=main,b=amd64
     origin mirror.example.jp
 500 http://mirror.example.jp/debian bookworm-updates/main amd64 Packages
     release v=12-updates,o=Debian,a=oldstable-updates,n=bookworm-updates,l=Debian,c=main,b=amd64
     origin mirror.example.jp
 500 http://mirror.example.jp/debian bookworm/main amd64 Packages
     release v=12.15,o=Debian,a=oldstable,n=bookworm,l=Debian,c=main,b=amd64
     origin mirror.example.jp
Pinned packages:
"""


def test_sources_come_from_the_hosts_debian_mirror_only() -> None:
    assert debian.debian_sources(POLICY) == [
        "deb http://mirror.example.jp/debian bookworm main",
        "deb http://mirror.example.jp/debian bookworm-updates main",
        "deb http://mirror.example.jp/debian-security bookworm-security main",
    ]


def test_a_host_of_a_newer_debian_lends_its_mirror_for_bookworm() -> None:
    trixie = POLICY.replace("bookworm", "trixie")
    assert debian.debian_sources(trixie)[0] == "deb http://mirror.example.jp/debian bookworm main"
    assert debian.debian_sources(trixie)[-1] == "deb http://mirror.example.jp/debian-security bookworm-security main"


def test_no_debian_archive_is_one_clear_error() -> None:
    only_node = "\n".join(POLICY.splitlines()[:6])
    with pytest.raises(ImageError, match="apt knows no Debian archive") as err:
        debian.debian_sources(only_node)
    assert "\n" not in err.value.message


def test_boot_configuration() -> None:
    root = "08bb3e84-de85-4468-ae50-cd04acb6e7c9"
    esp = debian.fat_volume_id(root)
    assert esp == "08BB3E84"
    fstab = debian.render_fstab(root, esp)
    assert f"UUID={root} / ext4" in fstab and "UUID=08BB-3E84 /boot/efi vfat" in fstab
    cfg = debian.render_grub_cfg(root, "6.1.0-57-cloud-amd64")
    assert f"search --no-floppy --fs-uuid --set=root {root}" in cfg
    assert f"linux /boot/vmlinuz-6.1.0-57-cloud-amd64 root=UUID={root} ro " in cfg
    assert "console=ttyS0" in cfg and "initrd /boot/initrd.img-6.1.0-57-cloud-amd64" in cfg
    assert "set timeout=0" in cfg
    assert debian.render_esp_grub_cfg(root).startswith(f"search.fs_uuid {root} root\n")
    assert "configfile $prefix/grub.cfg" in debian.render_esp_grub_cfg(root)
    assert debian.render_core_cfg(root) == f"search.fs_uuid {root} root\nset prefix=($root)'/boot/grub'\n"


def test_postgresql_is_installed_but_disabled_and_the_serial_console_is_kasous() -> None:
    assert "postgresql-15" in debian.PACKAGES
    assert "postgresql.service" in debian.DISABLE
    assert "serial-getty@ttyS0.service" in debian.MASK
    assert {"shim-signed", "grub-efi-amd64-signed", "grub-pc-bin", "qemu-guest-agent", "cloud-init"} <= set(
        debian.PACKAGES
    )


# -- the guest script, run here with its paths pointed at a temporary directory ----------------


def _run_guest(tmp: Path, env: dict[str, str], until: str, timeout: float = 20) -> list[str]:
    """Start the guest script, wait for ``until`` on its console, stop it as systemd would (SIGTERM)."""
    script = tmp / "guest"
    script.write_text(debian.render_guest_script())
    script.chmod(0o755)
    console = tmp / "console"
    console.write_text("")
    proc = subprocess.Popen(
        ["/bin/sh", str(script)],
        env={"PATH": "/usr/bin:/bin", "KASOU_CONSOLE": str(console), "KASOU_DATA": str(tmp / "data"), **env},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while until not in console.read_text():
            assert time.monotonic() < deadline, f"no {until!r} within {timeout} s: {console.read_text()!r}"
            assert proc.poll() is None, f"the script ended: {console.read_text()!r}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while "KASOU-SHUTDOWN" not in console.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a sleep of the writer's loop
        proc.wait(timeout=10)
    return console.read_text().splitlines()


def test_guest_script_on_bios_without_tpm(tmp_path: Path) -> None:
    env = {"KASOU_EFI": str(tmp_path / "no-efi"), "KASOU_TPM_DEV": str(tmp_path / "tpm0"),
           "KASOU_TPM_CLASS": str(tmp_path / "no-class")}  # fmt: skip
    lines = _run_guest(tmp_path, env, "seq 3")
    assert lines[:5] == ["firmware bios", "secureboot 0", "tpm 0", "recovered 0", "KASOU-READY"]
    seqs = [int(x.split()[1]) for x in lines if x.startswith("seq ")]
    assert seqs[:3] == [1, 2, 3] and seqs == list(range(1, len(seqs) + 1))
    assert lines[-1] == "KASOU-SHUTDOWN"
    log = (tmp_path / "data" / "seq.log").read_text().split()
    assert [int(n) for n in log] == seqs  # every acknowledged write is on disk, none that was not

    # A crash can leave a partial last line: it does not count; the writer goes on after the last whole one.
    with (tmp_path / "data" / "seq.log").open("a") as fh:
        fh.write("99")
    lines = _run_guest(tmp_path, env, f"seq {seqs[-1] + 2}")
    assert f"recovered {seqs[-1]}" in lines
    assert f"seq {seqs[-1] + 1}" in lines


def test_guest_script_on_uefi_with_secure_boot_and_a_tpm(tmp_path: Path) -> None:
    efivars = tmp_path / "efi" / "efivars"
    efivars.mkdir(parents=True)
    (efivars / debian.SECUREBOOT_VAR).write_bytes(b"\x06\x00\x00\x00\x01")
    (tmp_path / "tpm" / "tpm0").mkdir(parents=True)
    env = {"KASOU_EFI": str(tmp_path / "efi"), "KASOU_TPM_DEV": str(tmp_path / "none"),
           "KASOU_TPM_CLASS": str(tmp_path / "tpm")}  # fmt: skip
    lines = _run_guest(tmp_path, env, "seq 1")
    assert lines[:3] == ["firmware uefi", "secureboot 1", "tpm 1"]
    (efivars / debian.SECUREBOOT_VAR).write_bytes(b"\x06\x00\x00\x00\x00")  # Secure Boot off
    assert _run_guest(tmp_path, env, "KASOU-READY")[1] == "secureboot 0"


def test_heartbeat_finds_its_port_by_name(tmp_path: Path) -> None:
    ports, dev = tmp_path / "class", tmp_path / "dev"
    for port, name in (("vport1p1", "org.qemu.guest_agent.0"), ("vport1p2", debian.HEARTBEAT_PORT)):
        (ports / port).mkdir(parents=True)
        (ports / port / "name").write_text(name + "\n")
    dev.mkdir()
    (dev / "vport1p1").write_text("")
    (dev / "vport1p2").write_text("")
    script = tmp_path / "heartbeat"
    script.write_text(debian.render_heartbeat_script())
    proc = subprocess.Popen(
        ["/bin/sh", str(script)],
        env={"PATH": "/usr/bin:/bin", "KASOU_PORTS": str(ports), "KASOU_DEV": str(dev)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len((dev / "vport1p2").read_text().splitlines()) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    beats = (dev / "vport1p2").read_text().splitlines()
    assert all(b.startswith("hb ") and float(b.split()[1]) > 0 for b in beats)
    assert (dev / "vport1p1").read_text() == ""  # the guest agent's port is left alone
