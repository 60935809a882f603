"""vm import --convert through the API: virt-v2v in place on the imported disks.

The real ``virt-v2v-in-place`` boots a libguestfs appliance (minutes under TCG): here a stand-in
(tests/doubles/v2v/virt-v2v-in-place, with an ``nbdkit`` that is only looked for) is put first on PATH
and says what it was asked. The real tool
on the Debian image is the scenario test tests/integration/test_import_convert.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import Env
from tests.functional.test_api_import import do_import, nothing_left, refused, start_import
from tests.ovf_samples import raw_disk, vmdk

FAKE_DIR = Path(__file__).resolve().parents[1] / "doubles" / "v2v"


@pytest.fixture
def transfer(env: Env) -> Path:
    d = env.tmp / "transfer"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture
def fake_v2v(env: Env, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in first on PATH; returns the file where it records its calls."""
    log = env.tmp / "v2v-calls.log"
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_V2V_LOG", str(log))
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # reaped by nobody yet: dead all the same


def hanging(log: Path, timeout: float = 10) -> list[int]:
    """The pids of the stand-in and its child, once it is hanging."""
    pids = Path(f"{log}.pids")
    deadline = time.monotonic() + timeout
    while not pids.exists() or not pids.read_text().strip():
        assert time.monotonic() < deadline, "virt-v2v-in-place never started"
        time.sleep(0.05)
    return [int(p) for p in pids.read_text().split()]


def test_convert_runs_virt_v2v_on_every_disk_and_reports_what_it_changed(
    env: Env, transfer: Path, fake_v2v: Path
) -> None:
    vmdk(raw_disk(transfer / "x.raw"), transfer / "boot.vmdk")
    res = do_import(env, "legacy", disks=["boot.vmdk", "x.raw"], convert=True)
    plan_lines = res["report"]["lines"]
    assert "convert   virt-v2v in place: VMware drivers and tools out, virtio drivers in" in plan_lines, plan_lines
    job = env.api.get(f"/v1/jobs/{res['job']['id']}").json()
    conv = job["result"]["conversion"]
    assert conv["os"] == "12.15"
    assert conv["changes"] == ["converted 12.15 to run on KVM",
                               "This guest has virtio drivers installed"]  # fmt: skip
    assert conv["warnings"] == ["could not determine a way to update the configuration of Grub2"]
    lines = [ln for ln in job["result"]["report"] if ln.startswith("v2v ")]
    assert lines == [
        "v2v       converted 12.15 to run on KVM",
        "v2v       This guest has virtio drivers installed",
        "v2v       warning: could not determine a way to update the configuration of Grub2",
        lines[-1],
    ], lines
    assert lines[-1].startswith("v2v       virt-v2v took ") and lines[-1].endswith(" s"), lines
    vm = env.api.get("/v1/vms/legacy").json()
    assert vm["state"] == "stopped"
    got = calls(fake_v2v)
    assert got[0].startswith("argv: -i libvirtxml --root first ") and got[0].endswith("/domain.xml"), got
    assert "backend: direct" in got
    assert "backend settings: force_tcg" in got  # the agent's probe found no usable KVM (the test's agent: tcg)
    tmpdir = next(x for x in got if x.startswith("tmpdir: ")).removeprefix("tmpdir: ")
    assert Path(tmpdir).parent == env.tmp / "v2v" and not Path(tmpdir).exists()  # the agent's own, removed after
    assert f"cachedir: {env.tmp / 'v2v' / 'cache'}" in got
    assert [x.removeprefix("disk: ") for x in got if x.startswith("disk: ")] == [d["path"] for d in vm["disks"]]
    history = env.api.get("/v1/vms/legacy/history").json()
    assert history[-1]["detail"].endswith(", converted by virt-v2v"), history[-1]


def test_without_convert_virt_v2v_does_not_run(env: Env, transfer: Path, fake_v2v: Path) -> None:
    raw_disk(transfer / "a.raw")
    res = do_import(env, "plain", disks=["a.raw"])
    assert not any(ln.startswith("convert") for ln in res["report"]["lines"])
    assert calls(fake_v2v) == []


def test_convert_is_refused_at_once_where_virt_v2v_is_missing(
    env: Env, transfer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kasou.agent import v2v

    monkeypatch.setattr(v2v, "TOOL", "kasou-test-no-virt-v2v-in-place")  # the host has none
    raw_disk(transfer / "a.raw")
    before = sorted(p.name for p in transfer.iterdir())
    msg = refused(env, transfer, "old", 422, disks=["a.raw"], convert=True)
    assert msg == "--convert needs virt-v2v on host host1: apt-get install virt-v2v nbdkit", msg
    assert env.api.get("/v1/jobs").json() == []  # refused before any job
    nothing_left(env, transfer, before)
    r = start_import(env, "old", disks=["a.raw"], convert="yes")
    assert r.status_code == 422, r.text  # a strict boolean


def test_a_failed_conversion_fails_the_import_and_leaves_nothing(
    env: Env, transfer: Path, fake_v2v: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_V2V_MODE", "fail")
    raw_disk(transfer / "a.raw")
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, "nos", disks=["a.raw"], convert=True)
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "failed", job
    msg = job["error"]["message"]
    assert msg == ("virt-v2v-in-place failed: inspection could not detect the source guest (or physical "
                   "machine)."), msg  # fmt: skip
    assert len(calls(fake_v2v)) > 0
    nothing_left(env, transfer, before)
    assert not [p for p in (env.tmp / "v2v").iterdir() if p.name != "cache"]


def wait_progress(env: Env, job: dict[str, Any], at_least: float) -> None:
    deadline = time.monotonic() + 15
    while env.api.get(f"/v1/jobs/{job['id']}").json()["progress"] < at_least:
        assert time.monotonic() < deadline, "the job's progress never got there"
        time.sleep(0.05)


def test_a_conversion_past_its_time_is_killed_and_leaves_nothing(
    env: Env, transfer: Path, fake_v2v: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kasou.agent import v2v

    monkeypatch.setenv("FAKE_V2V_MODE", "hang")
    monkeypatch.setattr(v2v, "TIMEOUT_S", 2.0)
    raw_disk(transfer / "a.raw")
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, "slow", disks=["a.raw"], convert=True)
    assert r.status_code == 202, r.text
    pids = hanging(fake_v2v)
    job = env.wait(r.json()["job"])
    assert job["state"] == "failed" and job["error"]["message"] == "virt-v2v-in-place did not finish within 2 s", job
    assert all(gone(p) for p in pids), pids  # the tool and what it started (its process group)
    nothing_left(env, transfer, before)


def test_a_cancelled_conversion_is_killed_and_leaves_nothing(
    env: Env, transfer: Path, fake_v2v: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_V2V_MODE", "hang")
    raw_disk(transfer / "a.raw")
    before = sorted(p.name for p in transfer.iterdir())
    r = start_import(env, "stop", disks=["a.raw"], convert=True)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    pids = hanging(fake_v2v)
    wait_progress(env, job, 0.45)
    c = env.api.post(f"/v1/jobs/{job['id']}/cancel")
    assert c.status_code == 200 and c.json()["state"] == "failed", c.text
    assert c.json()["error"]["code"] == "cancelled"
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, f"virt-v2v-in-place {pids} still runs after the cancel"
        time.sleep(0.05)
    nothing_left(env, transfer, before)
