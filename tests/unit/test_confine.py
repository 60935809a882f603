"""QEMU confinement's pure parts: VM users (slots), the files a blockdev-add opens, qcow2 backing
names, cgroup limits on a v2 and a v1 tree (plain directories standing in for /sys/fs/cgroup)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kasou.config import ConfineSettings, confine_settings
from kasou.errors import HypervisorError
from kasou.hypervisor.qemu import confine as cf
from kasou.hypervisor.qemu.cmdline import RuntimeFiles, build_argv
from tests.unit.test_cmdline import BOOT, spec

SETTINGS = ConfineSettings(enabled=True, uid_base=64000, slots=3)


def test_each_vm_gets_the_lowest_free_slot_and_keeps_its_own(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("a", "b"):
        ident = cf.choose_identity(SETTINGS, run, name, "tcg")
        (run / name).mkdir(parents=True)
        cf.save_identity(run / name, ident)
    assert cf.read_identity(run / "a") == cf.Identity(0, 64000, 64000)
    assert cf.read_identity(run / "b") == cf.Identity(1, 64001, 64001)
    assert cf.choose_identity(SETTINGS, run, "b", "tcg").uid == 64001  # a restart keeps its user
    assert cf.choose_identity(SETTINGS, run, "c", "tcg").slot == 2
    (run / "c").mkdir()
    cf.save_identity(run / "c", cf.Identity(2, 64002, 64002))
    with pytest.raises(HypervisorError, match=r"no free VM user on this host for VM 'd'.*KASOU_VM_UID_COUNT"):
        cf.choose_identity(SETTINGS, run, "d", "tcg")


def test_the_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASOU_CONFINE", raising=False)
    assert confine_settings().enabled is True  # on by default
    monkeypatch.setenv("KASOU_CONFINE", "1")
    monkeypatch.setenv("KASOU_VM_UID_BASE", "70000")
    assert confine_settings() == ConfineSettings(True, 70000, 1000, 512)
    monkeypatch.setenv("KASOU_CONFINE", "maybe")
    with pytest.raises(ValueError, match="KASOU_CONFINE"):
        confine_settings()


def test_the_files_a_blockdev_add_opens() -> None:
    args = {
        "driver": "qcow2",
        "node-name": "n",
        "file": {"driver": "file", "filename": "/p/vm/o.qcow2"},
        "backing": {"driver": "raw", "file": {"driver": "file", "filename": "/p/b.raw"}},
    }
    assert list(cf.files_in(args)) == ["/p/vm/o.qcow2", "/p/b.raw"]
    assert list(cf.files_in({"driver": "nbd", "server": {"type": "inet"}})) == []


def _qcow2_with_backing(path: Path, backing: str) -> None:
    name = backing.encode()
    head = b"QFI\xfb" + struct.pack(">I", 3) + struct.pack(">QI", 512, len(name))
    path.write_bytes(head.ljust(512, b"\0") + name)


def test_backing_names_are_read_from_the_qcow2_header(tmp_path: Path) -> None:
    _qcow2_with_backing(tmp_path / "top.qcow2", "base.qcow2")
    _qcow2_with_backing(tmp_path / "abs.qcow2", "/srv/t/base.qcow2")
    (tmp_path / "raw").write_bytes(b"\0" * 64)
    assert cf.backing_of(tmp_path / "top.qcow2") == tmp_path / "base.qcow2"
    assert cf.backing_of(tmp_path / "abs.qcow2") == Path("/srv/t/base.qcow2")
    assert cf.backing_of(tmp_path / "raw") is None
    assert cf.backing_of(tmp_path / "missing") is None


def test_a_v2_cgroup_gets_the_vm_limits(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    group = cf.make_cgroup("emr1", "t1", 640 * 2**20, 2, root=tmp_path)
    d = tmp_path / "kasou" / "vm-emr1.t1"
    assert group.dirs == (d,)
    assert (d / "memory.max").read_text() == str(640 * 2**20)
    assert (d / "cpu.weight").read_text() == "200"
    assert (d / "io.weight").read_text() == "default 200"
    assert "+memory" in (tmp_path / "kasou" / "cgroup.subtree_control").read_text()


def test_a_v1_host_uses_its_mounted_controllers(tmp_path: Path) -> None:
    for ctrl in ("memory", "cpu"):  # no blkio here: it is left out
        (tmp_path / ctrl).mkdir()
        (tmp_path / ctrl / "cgroup.procs").write_text("")
    group = cf.make_cgroup("emr1", "t1", 640 * 2**20, 1, root=tmp_path)
    assert [d.relative_to(tmp_path).parts[0] for d in group.dirs] == ["memory", "cpu"]
    assert (tmp_path / "memory/kasou/vm-emr1.t1/memory.limit_in_bytes").read_text() == str(640 * 2**20)
    assert (tmp_path / "cpu/kasou/vm-emr1.t1/cpu.shares").read_text() == "1024"


def test_no_memory_cgroup_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="no memory cgroup for VM 'emr1'"):
        cf.make_cgroup("emr1", "t1", 2**30, 1, root=tmp_path)


def test_the_sandbox_denies_what_an_escaped_guest_would_need() -> None:
    argv = build_argv(spec(), RuntimeFiles(Path("/run/k/emr1"), Path("/log/emr1.log")), "tcg", BOOT)
    assert "-daemonize" not in argv and "-runas" not in argv
    assert cf.sandbox_args() == ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_the_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """A VM's QEMU user may search kasou's home (to reach its disks): the store must not be readable."""
    import os

    from kasou.store.sqlite import SqliteStore

    old = os.umask(0o022)
    try:
        store = SqliteStore(tmp_path / "kasou.db")
    finally:
        os.umask(old)
    for suffix in ("", "-wal"):
        assert (tmp_path / f"kasou.db{suffix}").stat().st_mode & 0o777 == 0o600, suffix
    del store


def test_a_disk_is_handed_over_and_a_read_only_one_only_made_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owners: dict[str, tuple[int, int]] = {}
    monkeypatch.setattr(cf.os, "chown", lambda p, u, g, follow_symlinks=True: owners.__setitem__(str(p), (u, g)))
    ident = cf.Identity(3, 64003, 64003)
    template = tmp_path / "templates" / "base.qcow2"
    template.parent.mkdir()
    template.write_bytes(b"x")
    template.chmod(0o600)
    disk = tmp_path / "disks" / "emr1" / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    _qcow2_with_backing(disk, str(template))
    cf.hand_over_disk(disk, ident, "emr1")
    assert owners == {str(disk): (64003, 64003), str(disk.parent): (64003, 64003)}
    assert disk.stat().st_mode & 0o777 == 0o600 and disk.parent.stat().st_mode & 0o777 == 0o700
    assert template.stat().st_mode & 0o777 == 0o644  # the template: read by its clones, never theirs
    iso = tmp_path / "images" / "install.iso"
    iso.parent.mkdir()
    iso.write_bytes(b"x")
    iso.chmod(0o600)
    cf.hand_over_disk(iso, ident, "emr1", readonly=True)
    assert str(iso) not in owners and iso.stat().st_mode & 0o777 == 0o644


def test_a_host_without_a_cgroup_file_system_is_seen(tmp_path: Path) -> None:
    assert not cf.cgroups_visible(tmp_path)  # e.g. under ip netns exec: a fresh /sys
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "cgroup.procs").write_text("")
    assert cf.cgroups_visible(tmp_path)


def test_remove_all_takes_one_agents_cgroups_and_names_those_in_use(tmp_path: Path) -> None:
    for ctrl in ("memory", "cpu", "blkio"):
        (tmp_path / ctrl).mkdir()
        (tmp_path / ctrl / "cgroup.procs").write_text("")
        for leaf in ("vm-a.abc123", "vm-b.abc123", "vm-a.def456"):
            (tmp_path / ctrl / "kasou" / leaf).mkdir(parents=True)
    busy = tmp_path / "memory" / "kasou" / "vm-b.abc123" / "tasks"  # a directory rmdir cannot remove: in use
    busy.write_text("42\n")
    left = cf.remove_all("abc123", timeout=0.2, root=tmp_path)
    assert left == [busy.parent]
    assert sorted(p.name for p in (tmp_path / "cpu" / "kasou").iterdir()) == ["vm-a.def456"]
    busy.unlink()
    assert cf.remove_all("abc123", timeout=0.2, root=tmp_path) == []
