"""A bad ``KASOU_*`` value is one line naming the variable, the value and what is allowed; never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kasou import config
from kasou.errors import InvalidSetting, KasouError

# (variable, bad value, other variables it needs)
BAD: list[tuple[str, str, dict[str, str]]] = [
    ("KASOU_API", "127.0.0.1:http", {}),
    ("KASOU_API", "127.0.0.1:70000", {}),
    ("KASOU_HA_LEASE_TTL", "six", {}),
    ("KASOU_HA_LEASE_TTL", "1", {}),
    ("KASOU_HA_FENCE_MARGIN", "abc", {}),
    ("KASOU_HA_FENCE_MARGIN", "10", {}),
    ("KASOU_HA_HEARTBEAT_TIMEOUT", "-1", {}),
    ("KASOU_VCPU_RATIO", "four", {}),
    ("KASOU_VCPU_RATIO", "0", {}),
    ("KASOU_VCPU_RATIO", "nan", {}),
    ("KASOU_BACKUP_KEEP", "7.5", {}),
    ("KASOU_BACKUP_KEEP", "0", {}),
    ("KASOU_ACCEL", "kvmm", {}),
    ("KASOU_ETCD_METRICS", "http://a:2381,http://b:2381", {"KASOU_ETCD": "http://a:2379"}),
    ("KASOU_SESSION_IDLE", "15min", {}),
    ("KASOU_SESSION_MAX", "-5", {}),
    ("KASOU_CONSOLE_IDLE", "soon", {}),
    ("KASOU_AUDIT_CHECKPOINT_MINUTES", "x", {}),
    ("KASOU_AUDIT_CHECKPOINT_EVERY", "0", {}),
    ("KASOU_REQUIRE_TOTP_FOR_ADMINS", "maybe", {}),
    ("KASOU_REQUIRE_TOTP_FOR", "admin,nurse", {}),
    ("KASOU_DIRECTORY_RECHECK", "1", {}),
    ("KASOU_DIRECTORY_RECHECK", "often", {}),
    ("KASOU_MAINTENANCE_ATTEMPTS", "0", {}),
    ("KASOU_MAINTENANCE_RETRY_S", "forever", {}),
    ("KASOU_MAINTENANCE_BACKOFF_S", "-1", {}),
    ("KASOU_VENDOR_MAX_PRIORITY", "101", {}),
    ("KASOU_VENDOR_MAX_PRIORITY", "high", {}),
    ("KASOU_STORAGE_ROOTS", "srv:relative", {}),
    ("KASOU_SIGNIN_RATE", "lots", {}),
    ("KASOU_CONFINE", "maybe", {}),
    ("KASOU_TRUSTED_PROXIES", "10.0.0.5,proxy", {}),
    ("KASOU_VM_UID_BASE", "10", {}),
    ("KASOU_QEMU_MEMORY_OVERHEAD_MIB", "lots", {}),
]
IDS = [f"{n}={v}" for n, v, _ in BAD]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("KASOU_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KASOU_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_defaults_pass(clean_env: Path) -> None:
    config.check_settings()
    assert config.vcpu_ratio_setting() == 4.0
    assert config.backup_keep_setting() is None
    assert config.accel_setting() == "auto"


@pytest.mark.parametrize(("name", "value", "extra"), BAD, ids=IDS)
def test_a_bad_setting_is_refused_by_name(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, extra: dict[str, str]
) -> None:
    for k, v in {name: value, **extra}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidSetting) as e:
        config.check_settings()
    assert e.value.message.startswith(f"{name}=") and value in e.value.message, e.value.message
    assert "allowed" in e.value.message or "must be" in e.value.message, e.value.message
    assert isinstance(e.value, KasouError)


@pytest.mark.parametrize(("name", "value", "extra"), BAD, ids=IDS)
def test_kasou_up_refuses_a_bad_setting_in_one_line(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    extra: dict[str, str],
) -> None:
    """Through the CLI's entry point (as the installed ``kasou`` runs it): exit 1, one line, nothing started."""
    from kasou.cli.main import main

    for k, v in {name: value, **extra}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["kasou", "up"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {name}=") and "\n" not in err and value in err, err
    assert not clean_env.exists()  # nothing made, nothing started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("command", "name", "value"),
    [
        ("serve", "KASOU_HA_LEASE_TTL", "six"),
        ("serve", "KASOU_VCPU_RATIO", "four"),
        ("agent", "KASOU_ACCEL", "kvmm"),
        ("agent", "KASOU_HA_HEARTBEAT_TIMEOUT", "-1"),
    ],
)
def test_a_service_started_with_a_bad_setting_prints_one_line(
    clean_env: Path, tmp_path: Path, command: str, name: str, value: str
) -> None:
    """``kasou serve`` read KASOU_HA_LEASE_TTL in its start-up and died with a ValueError traceback."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASOU_")}
    env.update(KASOU_HOME=str(clean_env), KASOU_API=f"127.0.0.1:{port}", **{name: value})
    args = ["serve", "--plain-http", "--address", f"127.0.0.1:{port}"] if command == "serve" else ["agent"]
    args += [] if command == "serve" else ["--listen", f"unix:{tmp_path}/agent.sock"]
    proc = subprocess.run(
        [sys.executable, "-m", "kasou", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}="), proc.stderr[-2000:]
