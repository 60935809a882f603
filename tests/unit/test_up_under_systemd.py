"""``kasou up``/``down`` are the one-host demo: on a host where systemd runs kasou's units for the same
home they refuse with the way out (systemctl), and change nothing. A fake ``systemctl`` on PATH plays
systemd."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou import services
from kasou.config import Paths
from kasou.errors import Conflict

FAKE_SYSTEMCTL = """#!/bin/sh
# is-active: 0 for the units in $FAKE_ACTIVE; show --property=MainPID: $FAKE_MAINPID.
case "$1" in
    is-active) case " $FAKE_ACTIVE " in *" $3 "*) exit 0 ;; *) echo inactive; exit 3 ;; esac ;;
    show) echo "${FAKE_MAINPID:-0}"; exit 0 ;;
esac
exit 1
"""


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.fixture
def unit_process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process standing for the units' main process, whose environment names a home."""
    home = tmp_path / "home"
    p = subprocess.Popen(["sleep", "60"], env=dict(os.environ, KASOU_HOME=str(home)))
    try:
        yield p
    finally:
        p.kill()
        p.wait(5)


def test_up_and_down_refuse_while_the_units_run_this_home(
    systemctl: Path, unit_process: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, KASOU_HOME=str(home), FAKE_ACTIVE="kasou-agent.service kasou-api.service",
               FAKE_MAINPID=str(unit_process.pid), KASOU_API="127.0.0.1:1")  # fmt: skip
    for verb, way_out in (("up", "systemctl start kasou-agent kasou-api"), ("down", "systemctl stop")):
        r = subprocess.run([sys.executable, "-m", "kasou", verb], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 4, r.stdout + r.stderr  # a conflict (docs/cli.md)
        line = r.stderr.strip()
        assert line.startswith("error: kasou-agent.service, kasou-api.service are active")
        assert "one-host demo" in line and way_out in line and "\n" not in line
    assert not home.exists()  # nothing was made, started or stopped


def test_units_of_another_home_or_inactive_units_do_not_count(
    systemctl: Path, unit_process: subprocess.Popen[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ACTIVE", "kasou-agent.service")
    monkeypatch.setenv("FAKE_MAINPID", str(unit_process.pid))
    assert services.systemd_units(Paths.from_env(tmp_path / "home")) == ["kasou-agent.service"]
    assert services.systemd_units(Paths.from_env(tmp_path / "elsewhere")) == []  # a test's or a lab's home
    with pytest.raises(Conflict, match="is active"):
        services.refuse_under_systemd(Paths.from_env(tmp_path / "home"), "up")
    # No main pid known: the units' default home.
    monkeypatch.setenv("FAKE_MAINPID", "0")
    assert services.systemd_units(Paths.from_env("/var/lib/kasou")) == ["kasou-agent.service"]
    monkeypatch.setenv("FAKE_ACTIVE", "")
    assert services.systemd_units(Paths.from_env("/var/lib/kasou")) == []


def test_no_systemctl_no_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl at all
    assert services.systemd_units(Paths.from_env(tmp_path)) == []


def test_a_units_home_from_its_settings_file(systemctl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit whose environment names no KASOU_HOME has the home of its settings file ([paths] home)."""
    file = tmp_path / "kasou.toml"
    file.write_text(f'[paths]\nhome = "{tmp_path / "unit-home"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASOU_")}
    p = subprocess.Popen(["sleep", "60"], env=dict(env, KASOU_CONFIG=str(file)))
    try:
        monkeypatch.setenv("FAKE_ACTIVE", "kasou-api.service")
        monkeypatch.setenv("FAKE_MAINPID", str(p.pid))
        assert services.systemd_units(Paths.from_env(tmp_path / "unit-home")) == ["kasou-api.service"]
        assert services.systemd_units(Paths.from_env("/var/lib/kasou")) == []
    finally:
        p.kill()
        p.wait(5)
