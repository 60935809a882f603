"""kasou's systemd units (packaging/systemd) and the Debian package's maintainer scripts
(packaging/debian), checked without systemd running: ``systemd-analyze verify`` in a throwaway root,
the settings that keep VMs running, and the scripts run against a temporary root (``DPKG_ROOT``)
with fake systemd tools."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging.units import PACKAGING, UNIT_DIR, UNITS, fake_tools, one, read_unit, verify, verify_root


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding kasou's units, this host's standard ones and an executable /opt/kasou/bin/kasou."""
    root = tmp_path_factory.mktemp("unit-root")
    verify_root(root)
    for u in UNITS:
        shutil.copy(UNIT_DIR / u, root / "lib/systemd/system" / u)
    for exe in (root / "opt/kasou/bin/kasou", root / "usr/bin/etcd"):
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify_clean(unit_root: Path, unit: str) -> None:
    r = verify(unit_root, unit)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stderr or r.stdout


def test_verify_catches_a_broken_unit(unit_root: Path) -> None:
    """The check above means something: a misplaced key and a missing command are reported."""
    broken = unit_root / "lib/systemd/system/kasou-broken.service"
    text = (UNIT_DIR / "kasou-agent.service").read_text()
    broken.write_text(text.replace("RestartSec=", "RestartSecs=").replace("/opt/kasou/bin/kasou", "/opt/nowhere"))
    try:
        r = verify(unit_root, "kasou-broken.service")
    finally:
        broken.unlink()
    assert "RestartSecs" in r.stderr and "/opt/nowhere" in r.stderr


def test_agent_unit_never_stops_a_vm() -> None:
    """Stopping or restarting the agent signals its main process only (KillMode=process): QEMU, swtpm,
    a replica's storage daemon and the host guard stay, wherever their cgroup is."""
    u = read_unit(UNIT_DIR / "kasou-agent.service")
    assert one(u, "Service", "KillMode") == "process"
    assert one(u, "Service", "Restart") == "on-failure"
    assert float(one(u, "Service", "RestartSec") or 0) >= 1
    assert u["Service"]["EnvironmentFile"] == ["-/etc/kasou/kasou.env", "-/etc/kasou/cluster.env"]
    assert (one(u, "Service", "ExecStart") or "").startswith("/opt/kasou/bin/kasou agent")
    assert one(u, "Service", "TasksMax") == "infinity"
    # Nothing that gives the agent (and so every QEMU it starts, which outlives it) a mount namespace
    # or a device policy of its own, and no no_new_privs inherited by its helpers.
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "DevicePolicy", "NoNewPrivileges",
                "ReadOnlyPaths", "ProtectKernelLogs", "ProtectKernelModules", "MemoryMax", "Delegate"):  # fmt: skip
        assert one(u, "Service", key) is None, key


@pytest.mark.parametrize("unit", ["kasou-api.service", "kasou-backup-server.service", "kasou-etcd.service"])
def test_other_units_are_hardened(unit: str) -> None:
    u = read_unit(UNIT_DIR / unit)
    assert one(u, "Service", "KillMode") == "control-group"
    assert one(u, "Service", "Restart") == "on-failure"
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert one(u, "Service", "PrivateTmp") == "yes"
    assert one(u, "Service", "ProtectSystem") in ("full", "strict")


# -- maintainer scripts ------------------------------------------------------------------------


def run_script(name: str, root: Path, log: Path, *args: str, active: str = "", enabled: str = "") -> str:
    """Run a maintainer script against ``root`` with fake systemd tools; what they were asked to do."""
    fake_tools(root.parent / "fakebin")
    env = dict(os.environ, DPKG_ROOT=str(root), FAKE_LOG=str(log), FAKE_ACTIVE=active, FAKE_ENABLED=enabled,
               PATH=f"{root.parent / 'fakebin'}:{os.environ['PATH']}")  # fmt: skip
    log.write_text("")
    r = subprocess.run(["sh", "-e", str(PACKAGING / "debian" / name), *args], env=env, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return log.read_text()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "run/systemd/system").mkdir(parents=True)  # "systemd runs here", as the scripts ask it
    (r / "etc").mkdir()
    return r


def test_first_install_makes_directories_and_enables_without_starting(root: Path, tmp_path: Path) -> None:
    calls = run_script("postinst", root, tmp_path / "log", "configure", "")
    assert oct((root / "var/lib/kasou").stat().st_mode & 0o777) == "0o711"
    assert (root / "var/lib/kasou/log").is_dir() and (root / "var/lib/kasou-backup").is_dir()
    assert os.readlink(root / "var/log/kasou") == "/var/lib/kasou/log"
    assert "deb-systemd-helper update-state kasou-agent.service" in calls
    assert "deb-systemd-helper update-state kasou-api.service" in calls
    # enabled (update-state + preset), never started unasked; only kasou-guests, which does nothing until the host
    # shuts down, is started so that this host's next shutdown moves or shuts down its VMs
    assert [ln for ln in calls.splitlines() if ln.startswith("deb-systemd-invoke")] == [
        "deb-systemd-invoke start kasou-guests.service"
    ]
    assert "enable kasou-backup-server" not in calls
    # Asked to start: KASOU_START=1 for dpkg.
    os.environ["KASOU_START"] = "1"
    try:
        calls = run_script("postinst", root, tmp_path / "log", "configure", "")
    finally:
        del os.environ["KASOU_START"]
    assert "deb-systemd-invoke start kasou-agent.service kasou-api.service" in calls


def test_upgrade_restarts_only_the_running_agent_and_api(root: Path, tmp_path: Path) -> None:
    active = "kasou-agent.service kasou-api.service"
    calls = run_script("prerm", root, tmp_path / "log", "upgrade", "0.2.0-1", active=active)
    assert calls == ""  # nothing is stopped before the upgrade
    calls = run_script("postinst", root, tmp_path / "log", "configure", "0.1.0-1", active=active, enabled=active)
    assert "deb-systemd-helper enable kasou-agent.service" in calls  # stays enabled
    invoked = [ln for ln in calls.splitlines() if ln.startswith("deb-systemd-invoke")]
    assert invoked == [
        "deb-systemd-invoke restart kasou-agent.service",
        "deb-systemd-invoke restart kasou-api.service",
        "deb-systemd-invoke start kasou-guests.service",  # a no-op when active: never restarted (its ExecStop)
    ]
    assert "stop" not in calls
    # A unit the operator had stopped is not started by an upgrade.
    calls = run_script("postinst", root, tmp_path / "log", "configure", "0.1.0-1", active="kasou-api.service")
    assert [ln for ln in calls.splitlines() if ln.startswith("deb-systemd-invoke")] == [
        "deb-systemd-invoke restart kasou-api.service",
        "deb-systemd-invoke start kasou-guests.service",
    ]


def test_remove_stops_services_and_purge_keeps_vm_disks(root: Path, tmp_path: Path) -> None:
    run_script("postinst", root, tmp_path / "log", "configure", "")
    (root / "var/lib/kasou/disks").mkdir()
    (root / "var/lib/kasou/disks/emr1.qcow2").write_bytes(b"QFI\xfb")
    calls = run_script("prerm", root, tmp_path / "log", "remove")
    assert (
        "deb-systemd-invoke stop kasou-guests.service kasou-api.service kasou-agent.service kasou-backup-server.service"
        " kasou-etcd.service" in calls
    )
    calls = run_script("postrm", root, tmp_path / "log", "purge")
    assert "deb-systemd-helper purge kasou-agent.service" in calls
    assert not (root / "var/log/kasou").is_symlink()
    assert (root / "var/lib/kasou/disks/emr1.qcow2").exists()  # a purge never deletes a hospital's VM disks


def test_postinst_warns_of_accounts_in_the_vm_uid_range(root: Path, tmp_path: Path) -> None:
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nlegacy:x:64010:64010::/:/bin/false\n")
    fake_tools(tmp_path / "fakebin")
    env = dict(os.environ, DPKG_ROOT=str(root), FAKE_LOG=str(tmp_path / "log"),
               PATH=f"{tmp_path / 'fakebin'}:{os.environ['PATH']}")  # fmt: skip
    r = subprocess.run(["sh", "-e", str(PACKAGING / "debian/postinst"), "configure", ""], env=env,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0 and "legacy(64010)" in r.stderr and "KASOU_VM_UID_BASE" in r.stderr


def test_the_guests_unit_acts_only_at_the_hosts_shutdown_while_the_agent_and_api_still_answer() -> None:
    u = read_unit(UNIT_DIR / "kasou-guests.service")
    after = " ".join(u["Unit"]["After"])
    assert "kasou-agent.service" in after and "kasou-api.service" in after  # stopped before them
    assert "kasou-etcd.service" in after  # and before the store they need to move VMs away
    assert one(u, "Service", "Type") == "oneshot" and one(u, "Service", "RemainAfterExit") == "yes"
    assert one(u, "Service", "ExecStart") is None  # starting it does nothing
    stop = one(u, "Service", "ExecStop") or ""
    assert stop.endswith("kasou host shutdown-guests --if-system-stopping"), stop
    assert one(u, "Service", "TimeoutStopSec") == "30min"
