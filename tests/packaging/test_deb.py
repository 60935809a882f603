"""The Debian package, built from this checkout by scripts/build-deb.sh (about 45 s: pip fetches or
reuses the dependencies' wheels, xz compresses about 70 MB): its metadata and contents, its units
verified where they land, its Python environment run from an extracted copy, and its maintainer
scripts run against that throwaway root with fake systemd tools. Nothing is installed on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.image.debian import debian_sources
from tests.packaging.systemd_container import ADDRESS, HOSTNAME, Container, build_root
from tests.packaging.units import REPO, UNITS, fake_tools, verify, verify_root

pytestmark = [pytest.mark.deb, pytest.mark.shares_machine]  # beside the fast tests; one build per worker


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "scripts/build-deb.sh"), str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.strip().splitlines()[-1])
    print(f"built {path.name}: {path.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s")
    return path


@pytest.fixture(scope="session")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's files extracted into a throwaway root (dpkg-deb -x), control files in DEBIAN/."""
    r = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(r)], check=True, timeout=120)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(r / "DEBIAN")], check=True, timeout=60)
    return r


def info(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_metadata(deb: Path) -> None:
    assert info(deb, "Package") == "kasou"
    assert info(deb, "Architecture") == "amd64"
    depends = info(deb, "Depends")
    for dep in ("python3.11", "qemu-system-x86", "qemu-utils", "init-system-helpers"):
        assert dep in depends
    listing = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in listing
    assert deb.stat().st_size < 40e6


def test_contents(deb: Path) -> None:
    names = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {line.split()[5].removeprefix(".") for line in names.splitlines()}
    for unit in UNITS:
        assert f"/lib/systemd/system/{unit}" in files
    for f in ("/opt/kasou/bin/kasou", "/opt/kasou/pyvenv.cfg", "/usr/bin/kasou", "/etc/kasou/kasou.env",
              "/usr/share/doc/kasou/copyright", "/usr/share/doc/kasou/docs/install.md",
              "/usr/share/kasou/kasou.toml.example", "/usr/share/doc/kasou/docs/configuration.md"):  # fmt: skip
        assert f in files, f
    # the manual pages, from the command line: man kasou, man kasou-vm-start, man kasou-host-shutdown-guests
    for page in ("kasou.1.gz", "kasou-vm-start.1.gz", "kasou-host-shutdown-guests.1.gz"):
        assert f"/usr/share/man/man1/{page}" in files, page
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)  # compiled by postinst
    assert all(" root/root " in line for line in names.splitlines())


def test_environment_runs_and_names_only_its_final_path(root: Path) -> None:
    venv = root / "opt/kasou"
    assert (venv / "bin/kasou").read_text().splitlines()[0] == "#!/opt/kasou/bin/python3.11"
    assert os.readlink(venv / "bin/python3.11") == "/usr/bin/python3.11"
    stray = subprocess.run(["grep", "-rlI", "-e", "/tmp/", str(venv / "bin"), str(venv / "pyvenv.cfg")],
                           capture_output=True, text=True)  # fmt: skip
    assert stray.stdout == ""
    r = subprocess.run([str(venv / "bin/python3"), "-m", "kasou", "version"], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "0.1.0", r.stderr
    assert (root / "etc/kasou/kasou.env").read_text().count("KASOU_") > 10
    conffiles = (root / "DEBIAN/conffiles").read_text().split()
    assert conffiles == ["/etc/kasou/kasou.env", "/etc/kasou/backup-server.env"]


@pytest.mark.parametrize("unit", UNITS)
def test_installed_units_verify(root: Path, unit: str) -> None:
    verify_root(root)  # the standard targets beside them; ExecStart is the package's real /opt/kasou/bin/kasou
    etcd = root / "usr/bin/etcd"  # kasou-etcd.service runs Debian's etcd (etcd-server, recommended)
    if not etcd.exists():
        etcd.parent.mkdir(parents=True, exist_ok=True)
        etcd.write_text("#!/bin/sh\n")
        etcd.chmod(0o755)
    r = verify(root, unit)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_maintainer_scripts_install_upgrade_remove_in_the_root(root: Path, tmp_path: Path) -> None:
    fake_tools(tmp_path / "bin")
    (root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    log = tmp_path / "log"
    env = dict(os.environ, DPKG_ROOT=str(root), FAKE_LOG=str(log), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    def run(script: str, *args: str, active: str = "") -> str:
        log.write_text("")
        r = subprocess.run([str(root / "DEBIAN" / script), *args], env={**env, "FAKE_ACTIVE": active},
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return log.read_text()

    calls = run("postinst", "configure", "")
    assert (root / "var/lib/kasou/log").is_dir() and (root / "var/log/kasou").is_symlink()
    settings = root / "etc/kasou/kasou.toml"  # the example, where there was none; an upgrade keeps it as it is
    assert settings.read_text() == (REPO / "packaging/kasou.toml.example").read_text()
    assert settings.stat().st_mode & 0o777 == 0o640
    settings.write_text("[ha]\nlease_ttl = 9\n")
    # a first install starts no service, only kasou-guests (which does nothing until the host shuts down)
    invoked = [ln for ln in calls.splitlines() if ln.startswith("deb-systemd-invoke")]
    assert invoked == ["deb-systemd-invoke start kasou-guests.service"], calls
    both = "kasou-agent.service kasou-api.service kasou-guests.service"
    assert run("prerm", "upgrade", "0.1.0-1", active=both) == ""
    calls = run("postinst", "configure", "0.1.0-1", active=both)
    assert "deb-systemd-invoke restart kasou-agent.service" in calls and "stop" not in calls
    assert "restart kasou-guests" not in calls  # its ExecStop would run: never on an upgrade
    assert settings.read_text() == "[ha]\nlease_ttl = 9\n"
    assert "deb-systemd-invoke stop" in run("prerm", "remove")
    run("postrm", "purge")
    assert (root / "var/lib/kasou").is_dir() and not (root / "var/log/kasou").exists() and not settings.exists()


# What lintian says of any Python application packaged as a virtual environment in /opt, and accepted:
# files in /opt (an add-on package's place), the environment's own interpreter in the #! lines, files of
# the dependencies' wheels as they ship them, and the changelog and maintainer of a site's own build.
ACCEPTED_LINTIAN_TAGS = (
    "dir-or-file-in-opt", "wrong-path-for-interpreter", "unusual-interpreter", "script-not-executable",
    "executable-not-elf-or-script", "initial-upload-closes-no-bugs", "bogus-mail-host",
    "bogus-mail-host-in-debian-changelog", "copyright-without-copyright-notice",
)  # fmt: skip


def test_lintian_finds_no_other_error(deb: Path) -> None:
    """Where lintian is installed (optional: apt-get install lintian; about 60 s here)."""
    if shutil.which("lintian") is None:
        print("lintian is not installed: the package was not linted")
        return
    r = subprocess.run(["lintian", "--suppress-tags", ",".join(ACCEPTED_LINTIAN_TAGS), str(deb)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("E:")]
    assert errors == [], r.stdout


@pytest.fixture
def machine(deb: Path, tmp_path: Path) -> Iterator[Container]:
    """A fresh Debian 12 with systemd as its PID 1 (tests/packaging/systemd_container.py), the package in /root."""
    if os.geteuid() != 0:
        pytest.skip("a systemd container needs root")
    sources = tmp_path / "sources.list"
    policy = subprocess.run(["apt-cache", "policy"], capture_output=True, text=True, check=True, timeout=120).stdout
    sources.write_text("\n".join(debian_sources(policy)) + "\n")
    root = tmp_path / "root"
    t0 = time.monotonic()
    c = Container(root, tmp_path / "console.log")
    try:
        build_root(root, deb, sources, tmp_path / "mmdebstrap.log")
        # kasou's tiny guest, as built on this machine (its kernel is the host's: the container has none)
        images = Path(os.environ.get("KASOU_IMAGES") or "/var/lib/kasou/images")
        subprocess.run([sys.executable, "-m", "kasou", "image", "build", "tiny"], check=True, capture_output=True,
                       timeout=900)  # fmt: skip
        shutil.copytree(images / "tiny", root / "var/lib/kasou/images/tiny")
    except BaseException:
        c.end()  # the root directory (about 1 GB) goes too
        raise
    try:
        c.start()
        print(f"container: built and booted in {time.monotonic() - t0:.1f} s")
        yield c
    finally:
        c.end()


def qemu_pids(c: Container) -> list[str]:
    return c.run("pgrep", "-f", "^qemu-system-x86_64 ", check=False).stdout.split()


def test_apt_install_then_cluster_init_runs_a_vm_under_systemd_and_restarts_upgrades_keep_it(
    machine: Container, deb: Path
) -> None:
    """The issue's check, on a fresh Debian 12 under systemd: apt install ./kasou_*.deb, kasou cluster init,
    a VM created and started; then a restart of the agent, and an upgrade of the package, leave it running."""
    c = machine
    t0 = time.monotonic()
    c.run("apt-get", "install", "-y", f"/root/{deb.name}", timeout=600)  # everything it needs is there: no download
    installed = time.monotonic() - t0
    assert c.run("systemctl", "is-active", "kasou-guests.service").stdout.strip() == "active"
    assert c.run("systemctl", "is-active", "kasou-agent.service", check=False).stdout.strip() == "inactive"
    t0 = time.monotonic()
    r = c.run("kasou", "cluster", "init", "--address", ADDRESS, timeout=300)
    initialized = time.monotonic() - t0
    assert "kasou cluster join" in r.stdout, r.stdout
    for unit in ("kasou-etcd", "kasou-agent", "kasou-api"):
        state = c.run("systemctl", "is-active", unit, check=False).stdout.strip()
        assert state == "active", f"{unit}: {state}\n{c.journal(unit)}"
    # The CLI finds the API, its token and CA from the settings cluster init wrote.
    hosts = json.loads(c.run("kasou", "host", "list", "-o", "json").stdout)
    assert [(h["name"], h["state"]) for h in hosts] == [(HOSTNAME, "up")], hosts
    t0 = time.monotonic()
    c.run("kasou", "vm", "create", "demo", "--image", "tiny", "--memory", "128", "--start", timeout=300)
    vm = json.loads(c.run("kasou", "vm", "wait", "demo", "--timeout", "180", "-o", "json", timeout=200).stdout)
    started = time.monotonic() - t0
    assert vm["state"] == "running" and vm["guest_ready"], vm
    pid = qemu_pids(c)
    assert len(pid) == 1, pid

    def still_running(after: str) -> None:
        v = json.loads(c.run("kasou", "vm", "wait", "demo", "--timeout", "120", "-o", "json", timeout=150).stdout)
        assert qemu_pids(c) == pid and v["started_at"] == vm["started_at"], f"{after}: the VM was restarted"

    c.run("systemctl", "restart", "kasou-agent.service")
    still_running("after systemctl restart kasou-agent")
    t0 = time.monotonic()
    c.run("apt-get", "install", "-y", "--reinstall", f"/root/{deb.name}", timeout=600)
    upgraded = time.monotonic() - t0
    for unit in ("kasou-agent", "kasou-api"):
        assert c.run("systemctl", "is-active", unit, check=False).stdout.strip() == "active", c.journal(unit)
    still_running("after the package was installed again (prerm upgrade, postinst configure)")

    # The host shuts down: kasou-guests' ExecStop shuts the VM down gracefully before the agent, API and store stop.
    log = c.root.parent / "kasou-guests.log"
    follow = c.follow_journal("kasou", log)
    try:
        time.sleep(1)
        t0 = time.monotonic()
        c.run("systemctl", "poweroff", check=False)
        deadline = time.monotonic() + 120
        while "shutdown: " not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        shut = time.monotonic() - t0
    finally:
        follow.kill()
        follow.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert "shutdown: 1 succeeded, 0 failed" in text and "graceful shutdown" in text, text
    print(f"apt install {installed:.1f} s, cluster init {initialized:.1f} s, VM created and ready {started:.1f} s, "
          f"reinstall {upgraded:.1f} s, VMs shut down at poweroff {shut:.1f} s")  # fmt: skip
