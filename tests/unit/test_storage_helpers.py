"""Pure parts of pools and mirrored disks: pool figures, mirror states, the record after a host's report."""

from __future__ import annotations

import pytest

from kasou.agent.pools import PoolUsage
from kasou.control.mirrors import follow, launch_disk
from kasou.control.pools import FULL_BELOW_BYTES, PoolRecord, disks_in, measure
from kasou.control.records import VMRecord
from kasou.errors import InvalidSpec
from kasou.hypervisor.base import MirrorStatus
from kasou.hypervisor.qemu.mirrors import Mirrored, disk_status
from kasou.model.pools import PoolCreate, overlaps, validate_pool_path
from kasou.model.spec import DiskSpec, MirrorCopy
from kasou.model.state import VMState

GiB = 1 << 30


def _usage(total: int, free: int, allocated: int) -> PoolUsage:
    return PoolUsage(name="p", path="/srv/p", exists=True, writable=True, fs_total_bytes=total, fs_free_bytes=free,
                     allocated_bytes=allocated)  # fmt: skip


def test_pool_figures() -> None:
    rec = PoolRecord(name="p", path="/srv/p", capacity_bytes=10 * GiB, overcommit=1.5, warn_free_pct=10)
    v = measure(rec, "h1", _usage(100 * GiB, 50 * GiB, 2 * GiB), provisioned=12 * GiB)
    assert (v.state, v.capacity_bytes, v.free_bytes, v.limit_bytes) == ("ok", 10 * GiB, 8 * GiB, 15 * GiB)
    assert v.overcommit_ratio == 1.2
    low = measure(rec, "h1", _usage(100 * GiB, 50 * GiB, int(9.5 * GiB)), provisioned=0)
    assert low.state == "low"
    full = measure(rec, "h1", _usage(100 * GiB, FULL_BELOW_BYTES - 1, 0), provisioned=0)
    assert full.state == "full"  # the file system is full even though the pool's own share is not
    gone = measure(rec, "h1", PoolUsage(name="p", path="/srv/p", exists=False, writable=False, error="no"), 0)
    assert gone.state == "missing" and gone.error == "no"
    fs = measure(rec.model_copy(update={"capacity_bytes": None}), "h1", _usage(20 * GiB, 10 * GiB, GiB), 0)
    assert fs.capacity_bytes == 20 * GiB  # no capacity given: the file system's size


def test_provisioned_counts_both_copies_each_in_its_pool() -> None:
    d = DiskSpec(id="disk0", size_bytes=GiB, path="/a/vm/disk0.qcow2", pool="a",
                 mirror=MirrorCopy(pool="b", path="/b/vm/disk0.qcow2", state="in_sync"))  # fmt: skip
    recs = [VMRecord(name="vm", uuid="u", vcpus=1, memory_mib=128, host="h1", disks=[d])]
    assert disks_in(recs, "a", "h1", False) == [("/a/vm/disk0.qcow2", GiB)]
    assert disks_in(recs, "b", "h1", False) == [("/b/vm/disk0.qcow2", GiB)]
    assert disks_in(recs, "b", "h2", False) == []  # a local pool counts per host
    assert disks_in(recs, "b", "h2", True) == [("/b/vm/disk0.qcow2", GiB)]


@pytest.mark.parametrize(
    ("path", "ok"),
    [("/srv/ssd", True), ("/srv/ssd/", True), ("relative", False), ("/srv/../etc", False), ("/etc", False),
     ("/proc/x", False), ("/", False), ("/srv/a,b", False), ("", False)],
)  # fmt: skip
def test_pool_paths(path: str, ok: bool) -> None:
    if ok:
        assert validate_pool_path(path) == path.rstrip("/")
    else:
        with pytest.raises(InvalidSpec):
            validate_pool_path(path)


@pytest.mark.parametrize(
    "path",
    ["/var/lib/kasou", "/var/lib/kasou/pools", "/etc/cron.d", "/root", "/root/pools", "/etc/systemd/system",
     "/var", "/var/lib", "/usr/local/pools", "/boot/pools", "/home/pools", "/opt/pools", "/srv/kasou-home",
     "/srv/kasou-home/pools", "/srv", "/mnt/images/tiny", "/etc/pools", "/run/pools"],
)  # fmt: skip
def test_pool_paths_only_under_the_storage_roots_and_clear_of_system_and_kasou_directories(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KASOU_STORAGE_ROOTS", "/srv:/mnt:/etc:/run")  # a root over a system directory opens nothing
    monkeypatch.setenv("KASOU_HOME", "/srv/kasou-home")
    monkeypatch.setenv("KASOU_IMAGES", "/mnt/images")
    with pytest.raises(InvalidSpec) as e:
        validate_pool_path(path)
    msg = e.value.message
    assert path in msg and "/srv, /mnt" in msg and "\n" not in msg, msg
    assert e.value.to_dict()["details"] == {"field": "path"}
    for good in ("/srv/ssd", "/mnt/nas/kasou", "/srv/kasou-pools"):
        assert validate_pool_path(good) == good


def test_the_default_storage_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASOU_STORAGE_ROOTS")
    for good in ("/srv/ssd", "/var/lib/kasou-pools/fast", "/mnt/nas", "/media/usb"):
        assert validate_pool_path(good) == good
    with pytest.raises(InvalidSpec, match=r"/tmp/p is outside the storage roots \(/srv, /var/lib/kasou-pools"):
        validate_pool_path("/tmp/p")


def test_pool_create_rules() -> None:
    assert overlaps("/srv/a", "/srv/a/b") and overlaps("/srv/a", "/srv/a") and not overlaps("/srv/a", "/srv/ab")
    for bad in ({"overcommit": 0.9}, {"overcommit": float("inf")}, {"warn_free_pct": 95}, {"capacity": "lots"},
                {"name": "default"}):  # fmt: skip
        with pytest.raises(InvalidSpec):
            PoolCreate.parse({"name": "p", "path": "/srv/p", **bad})


def _mirrored(state: str = "in_sync", clean: bool = False) -> DiskSpec:
    return DiskSpec(id="disk0", size_bytes=GiB, path="/a/d.qcow2", pool="a",
                    mirror=MirrorCopy(pool="b", path="/b/d.qcow2", state=state, clean=clean))  # type: ignore[arg-type]  # fmt: skip


def test_launch_disk_copies_nothing_only_after_a_clean_stop() -> None:
    rec = VMRecord(name="vm", uuid="u", vcpus=1, memory_mib=128, state=VMState.STOPPED)
    assert launch_disk(rec, _mirrored(clean=True)).mirror_sync == "none"
    assert launch_disk(rec, _mirrored(clean=False)).mirror_sync == "full"
    crashed = rec.model_copy(update={"state": VMState.CRASHED})
    assert launch_disk(crashed, _mirrored(clean=True)).mirror_sync == "full"
    degraded = _mirrored("degraded").model_copy(update={"mirror": MirrorCopy(pool="b", state="degraded")})
    assert launch_disk(rec, degraded).mirror is None  # starts on its one copy


def test_follow_a_switch_to_the_second_copy() -> None:
    st = MirrorStatus(disk_id="disk0", state="degraded", path="/b/d.qcow2", failed="/a/d.qcow2", error="I/O error")
    d = follow(_mirrored(), st)
    assert (d.path, d.pool) == ("/b/d.qcow2", "b")
    assert d.mirror is not None and (d.mirror.pool, d.mirror.path, d.mirror.state) == ("a", None, "degraded")
    assert d.mirror.failed == "/a/d.qcow2" and d.mirror.error == "I/O error"


def test_follow_a_lost_second_copy_and_its_rebuild() -> None:
    lost = MirrorStatus(disk_id="disk0", state="degraded", path="/a/d.qcow2", failed="/b/d.qcow2", error="removed")
    d = follow(_mirrored(clean=True), lost)
    assert d.path == "/a/d.qcow2" and d.mirror is not None
    assert (d.mirror.state, d.mirror.path, d.mirror.failed, d.mirror.clean) == ("degraded", None, "/b/d.qcow2", False)
    assert follow(d, lost) == d  # reported again: nothing changes
    syncing = MirrorStatus(disk_id="disk0", state="syncing", path="/a/d.qcow2", second="/b/d.qcow2")
    d2 = follow(_mirrored("syncing"), syncing.model_copy(update={"state": "in_sync"}))
    assert d2.mirror is not None and d2.mirror.state == "in_sync"


def test_driver_status_model() -> None:
    rec = Mirrored(disk_id="disk0", source="/a", target="/b", since=1.0)
    assert disk_status("disk0", None, None).state == "none"
    assert disk_status("disk0", rec, {"device": "mirror-disk0", "ready": True, "status": "ready"}).state == "in_sync"
    syncing = disk_status("disk0", rec, {"device": "mirror-disk0", "status": "running", "len": 100, "offset": 25})
    assert syncing.state == "syncing" and syncing.progress == 0.25
    failed = disk_status("disk0", rec, {"device": "mirror-disk0", "status": "concluded", "error": "No space"})
    assert failed.state == "degraded" and "No space" in (failed.error or "")
    gone = Mirrored(disk_id="disk0", source="/b", target=None, since=1.0, error="switched", failed="/a")
    st = disk_status("disk0", gone, None)
    assert (st.state, st.path, st.failed, st.error) == ("degraded", "/b", "/a", "switched")
