"""A 3-host lab (hosts in network namespaces, etcd, the production agent and control plane),
with real tiny guests: live migration, maintenance, the ledger, a control plane taking over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.qemu_rig import seqs

pytestmark = pytest.mark.qemu

KASOU = [sys.executable, "-m", "kasou"]


class Lab:
    def __init__(self, lab_dir: Path, env: dict[str, str]) -> None:
        self.dir = lab_dir
        self.base_env = env
        self._host_env: dict[str, tuple[int | None, dict[str, str]]] = {}

    def run(
        self, *args: str, host: str = "h2", check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.base_env)
        env.update(self.host_env(host))
        r = subprocess.run([*KASOU, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kasou {' '.join(args)} (via {host}) failed: {r.stderr.strip()}")
        return r

    def host_env(self, host: str) -> dict[str, str]:
        """``kasou lab env HOST``, asked again only when the lab's state changed (a lab up, kill or revive)."""
        try:
            stamp = (self.dir / "lab.json").stat().st_mtime_ns
        except OSError:
            stamp = None
        cached = self._host_env.get(host)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        out = subprocess.run(
            [*KASOU, "lab", "env", host], env=self.base_env, capture_output=True, text=True, check=True, timeout=60
        )
        env = {}
        for line in out.stdout.splitlines():
            line = line.removeprefix("export ").strip()
            k, _, v = line.partition("=")
            env[k] = v.strip("'\"")
        self._host_env[host] = (stamp, env)
        return env

    def json(self, *args: str, host: str = "h2") -> Any:
        return json.loads(self.run(*args, "--json", host=host).stdout)

    def vm(self, name: str, host: str = "h2") -> dict[str, Any]:
        return dict(self.json("vm", "show", name, host=host))

    def wait(self, what: str, cond: Any, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def ready(self, name: str, host: str = "h2", timeout: float = 120) -> dict[str, Any]:
        """``kasou vm wait NAME``: one process that polls the API (not a CLI process per poll)."""
        r = self.run("vm", "wait", name, "--timeout", f"{timeout:g}", "-o", "json", host=host, check=False,
                     timeout=timeout + 60)  # fmt: skip
        if r.returncode != 0:
            raise AssertionError(f"waiting for {name}'s guest to be ready ({r.returncode}): {r.stderr.strip()}")
        return dict(json.loads(r.stdout))

    def serial(self, host: str, vm: str) -> str:
        p = self.dir / host / "home" / "log" / "serial" / f"{vm}.log"
        try:
            return p.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def seqs(self, host: str, vm: str) -> list[int]:
        return seqs(self.serial(host, vm))

    def assert_counter_continues(self, vm: str, src: str, dst: str) -> None:
        """The writer's counter goes on without a gap or a repeat from the source's log into the destination's.

        A line the guest was printing at the switch-over is cut in two, its end in the destination's log,
        so the two logs are read as one stream.
        """
        self.wait("writes on the destination", lambda: self.seqs(dst, vm))
        both = seqs(self.serial(src, vm) + self.serial(dst, vm))
        assert both == list(range(both[0], both[0] + len(both))), "the counter skipped or repeated"
        assert self.seqs(dst, vm)[-1] > self.seqs(src, vm)[-1]


def make_lab(
    tiny_image: Path, prefix: str = "kasou-lab-", backup_server: bool = False, directory: bool = False
) -> Iterator[Lab]:
    """A 3-host lab in its own directory (with a backup server, a Samba AD directory if asked), taken down (every
    process, namespace and file) at the end."""
    lab_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    env = dict(os.environ, KASOU_LAB_DIR=str(lab_dir), KASOU_IMAGES=str(tiny_image))
    for k in ("KASOU_API", "KASOU_TOKEN", "KASOU_HOME"):
        env.pop(k, None)
    try:
        more = (["--backup-server"] if backup_server else []) + (["--directory"] if directory else [])
        subprocess.run([*KASOU, "lab", "up", "--hosts", "3", *more], env=env, check=True, capture_output=True,
                       timeout=300)  # fmt: skip
        yield Lab(lab_dir, env)
    finally:
        keep = os.environ.get("KASOU_TEST_KEEP_LOGS")  # a directory to copy the lab's logs into
        if keep:
            shutil.copytree(lab_dir, Path(keep) / lab_dir.name, ignore=_not_logs, dirs_exist_ok=True)
        subprocess.run([*KASOU, "lab", "down"], env=env, capture_output=True, timeout=180)


def _not_logs(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not (n.endswith(".log") or (Path(folder) / n).is_dir()) or n.endswith(".sock")]


@pytest.fixture(scope="module")
def lab(tiny_image: Path) -> Iterator[Lab]:
    yield from make_lab(tiny_image, backup_server=True)


def test_cluster_hosts_and_placement(lab: Lab) -> None:
    hosts = lab.json("host", "list")
    assert [h["name"] for h in hosts] == ["h1", "h2", "h3"]
    assert all(h["state"] == "up" for h in hosts)
    info = json.loads(lab.run("api", "openapi").stdout)  # the CLI works against any host
    assert "/v1/vms/{name}/migrate" in info["paths"]


def test_a_backup_is_copied_to_the_labs_backup_server(lab: Lab) -> None:
    """``lab up --backup-server`` sets kasou's backup server: a generation (of a stopped VM: no guest to boot)
    is copied to it, encrypted to the lab's site key, and ``backup status`` says so."""
    lab.run("vm", "create", "bk", "--image", "tiny")
    try:
        out = lab.run("backup", "create", "bk", host="h1").stdout
        assert "copied to the backup server" in out, out
        held = lab.json("backup", "list", "bk", "--server", host="h3")
        assert [g["generation"] for g in held] == [1], held
        status = {s["vm"]: s for s in lab.json("backup", "status")}
        assert status["bk"]["state"] == "ok" and status["bk"]["offsite_generation"] == 1, status["bk"]
    finally:
        lab.run("vm", "delete", "bk", check=False)


def test_migrate_shared_storage_keeps_the_guest_running(lab: Lab) -> None:
    lab.run("vm", "create", "emr", "--image", "tiny", "--shared", "--start")
    before = lab.ready("emr")
    src = before["host"]
    dst = next(h for h in ("h1", "h2", "h3") if h != src)
    lab.wait("writes", lambda: len(lab.seqs(src, "emr")) >= 10)
    r = lab.run("vm", "migrate", "emr", "--to", dst)
    assert f"-> {dst}" in r.stdout
    after = lab.ready("emr")
    assert after["host"] == dst and after["state"] == "running"
    assert after["uptime_s"] > before["uptime_s"], "the guest's own uptime keeps increasing"
    lab.assert_counter_continues("emr", src, dst)
    hist = lab.json("vm", "history", "emr")
    assert [e["event"] for e in hist] == ["defined", "started", "migrated"]
    assert hist[-1]["host"] == dst and hist[-1]["from_host"] == src
    report = {r["name"]: r for r in lab.json("report", "uptime")}
    assert report["emr"]["stops"] == 0 and report["emr"]["migrations"] == 1


def test_migrate_local_disk_copies_it(lab: Lab) -> None:
    lab.run("vm", "create", "lab1", "--image", "tiny", "--start")
    v = lab.ready("lab1")
    src = v["host"]
    dst = next(h for h in ("h3", "h1", "h2") if h != src)
    lab.wait("writes", lambda: len(lab.seqs(src, "lab1")) >= 10)
    lab.run("vm", "migrate", "lab1", "--to", dst)
    after = lab.ready("lab1")
    assert after["host"] == dst
    assert f"/{dst}/home/disks/" in after["disks"][0]["path"]
    assert not Path(v["disks"][0]["path"]).exists(), "the source copy of the disk is removed"
    lab.assert_counter_continues("lab1", src, dst)


def test_migrate_a_mirrored_vm_it_gets_a_new_second_copy(lab: Lab) -> None:
    for pool in ("ma", "mb"):
        lab.run("pool", "create", pool, "--path", str(lab.dir / f"pool-{pool}"))
    lab.run("vm", "create", "pacs", "--image", "tiny", "--mirror", "ma,mb", "--start")
    v = lab.ready("pacs")
    src, second = v["host"], v["disks"][0]["mirror"]["path"]
    dst = next(h for h in ("h2", "h3", "h1") if h != src)
    lab.wait("writes", lambda: len(lab.seqs(src, "pacs")) >= 10)
    r = lab.run("vm", "migrate", "pacs", "--to", dst)
    assert f"-> {dst}" in r.stdout
    after = lab.ready("pacs")
    d = after["disks"][0]
    assert after["host"] == dst and d["path"] == str(lab.dir / "pool-ma" / "pacs" / "disk0-2.qcow2"), d
    assert d["pool"] == "ma", d
    assert d["mirror"]["state"] == "in_sync" and d["mirror"]["pool"] == "mb" and d["mirror"]["path"] == second, d
    assert not Path(v["disks"][0]["path"]).exists(), "the source's copy of the disk is removed"
    lab.assert_counter_continues("pacs", src, dst)
    assert [e["kind"] for e in lab.json("event", "list", "--subject", "vm/pacs")] == []  # planned: no alarm
    n = lab.seqs(dst, "pacs")[-1]
    lab.wait("writes on both copies", lambda: lab.seqs(dst, "pacs")[-1] >= n + 10)
    lab.run("vm", "stop", "pacs")
    cmp = subprocess.run(["qemu-img", "compare", "-q", d["path"], second], timeout=60)
    assert cmp.returncode == 0, "the two copies differ after a clean stop"
    lab.run("vm", "delete", "pacs", "--force")
    assert not Path(d["path"]).exists() and not Path(second).exists()


def test_migration_bad_input_changes_nothing(lab: Lab) -> None:
    lab.run("vm", "create", "rx", "--image", "tiny", "--shared", "--start")
    v = lab.ready("rx")
    for args, text, code in (
        (["--to", "nosuch"], "no host named", 3),  # not found
        (["--to", v["host"]], "already runs on", 2),  # bad input
        (["--to", "../h1"], "must not contain", 2),
        (["--downtime-ms", "0"], "downtime_ms", 2),
    ):
        r = lab.run("vm", "migrate", "rx", *args, check=False)
        assert r.returncode == code and text in r.stderr, (args, r.stderr)
    assert lab.vm("rx")["host"] == v["host"]
    lab.run("vm", "stop", "rx")
    r = lab.run("vm", "migrate", "rx", check=False)
    assert r.returncode == 4 and "only a running VM" in r.stderr  # the wrong state: a conflict
    assert [e["event"] for e in lab.json("vm", "history", "rx")] == ["defined", "started", "stopped"]
    lab.run("vm", "delete", "rx")


def test_aborted_migration_stays_on_the_source(lab: Lab) -> None:
    lab.run("vm", "create", "slow", "--image", "tiny", "--start")
    v = lab.ready("slow")
    src = v["host"]
    r = lab.run("vm", "migrate", "slow", "--bandwidth", "2", "--no-wait")
    job = r.stdout.split()[-1]
    lab.wait("migration running", lambda: lab.json("job", "list", "--vm", "slow")[-1]["progress"] > 0.05, timeout=60)
    # A second migration of the same VM while one runs is refused.
    r2 = lab.run("vm", "migrate", "slow", check=False)
    assert r2.returncode == 4 and "busy" in r2.stderr
    lab.run("job", "cancel", job)
    after = lab.ready("slow")
    assert after["host"] == src and after["state"] == "running"
    assert [e["event"] for e in lab.json("vm", "history", "slow")] == ["defined", "started"]
    n = len(lab.seqs(src, "slow"))
    lab.wait("the guest keeps writing on the source", lambda: len(lab.seqs(src, "slow")) > n + 5)
    lab.run("vm", "delete", "slow", "--force")


@pytest.mark.scenario
@pytest.mark.timeout(1200)
def test_maintenance_of_each_host_stops_nothing(lab: Lab) -> None:
    names = [f"m{i}" for i in range(6)]
    for n in names:
        lab.run("vm", "create", n, "--image", "tiny", "--shared", "--start")

    def ours() -> list[dict[str, Any]]:
        vs = [x for x in lab.json("vm", "list") if x["name"] in names]
        return vs if len(vs) == len(names) and all(x["guest_ready"] for x in vs) else []

    vms = lab.wait("all guests ready", ours)
    uptimes = {v["name"]: v["uptime_s"] for v in vms}
    for host in ("h1", "h2", "h3"):
        t0 = time.monotonic()
        lab.run("host", "maintenance", host, timeout=900)
        print(f"maintenance of {host}: emptied in {time.monotonic() - t0:.1f} s")
        vms = {v["name"]: v for v in lab.json("vm", "list")}
        assert all(vms[n]["host"] != host for n in names), f"{host} still has VMs"
        hosts = {h["name"]: h for h in lab.json("host", "list")}
        assert hosts[host]["state"] == "maintenance"
        lab.run("host", "maintenance", host, "--off")
        for v in lab.wait("all guests ready", ours):
            assert v["state"] == "running"
            if v["uptime_s"] < uptimes[v["name"]]:
                n = v["name"]
                boots = {
                    h: [ln for ln in lab.serial(h, n).splitlines() if ln.startswith("recovered")]
                    for h in ("h1", "h2", "h3")
                }
                hist = lab.json("vm", "history", n)
                raise AssertionError(f"{n}'s guest uptime went back: {v} boots={boots} history={hist}")
            uptimes[v["name"]] = v["uptime_s"]
    report = {r["name"]: r for r in lab.json("report", "uptime")}
    for n in names:
        assert report[n]["stops"] == 0
    for n in names:
        lab.run("vm", "delete", n, "--force")


def test_control_plane_host_killed_another_takes_over(lab: Lab) -> None:
    leader = lab.json("cluster")["leader"]
    assert leader in ("h1", "h2", "h3")
    survivor = next(h for h in ("h1", "h2", "h3") if h != leader)
    subprocess.run([*KASOU, "lab", "kill", leader], env=lab.base_env, check=True, capture_output=True, timeout=60)
    try:
        t0 = time.monotonic()
        new = lab.wait(
            "a new leader",
            lambda: (c := lab.json("cluster", host=survivor))["leader"] not in (None, leader) and c,
            timeout=60,
        )
        took = time.monotonic() - t0
        assert new["leader"] != leader
        assert took < 30, f"takeover took {took:.1f} s"
        lab.run("vm", "create", "after", "--image", "tiny", "--start", host=survivor)
        v = lab.ready("after", host=survivor)
        assert v["host"] != leader
        lab.run("vm", "delete", "after", "--force", host=survivor)
    finally:
        subprocess.run([*KASOU, "lab", "revive", leader], env=lab.base_env, capture_output=True, timeout=180)
