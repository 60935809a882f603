"""Helpers for the tests of kasou's systemd units and Debian package: read a unit file, verify units
with ``systemd-analyze verify`` in a throwaway root (PID 1 need not be systemd), and fake the
systemd tools the maintainer scripts call."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
UNIT_DIR = PACKAGING / "systemd"
UNITS = (
    "kasou-agent.service",
    "kasou-api.service",
    "kasou-backup-server.service",
    "kasou-guests.service",
    "kasou-etcd.service",
)
SYSTEM_UNITS = Path("/lib/systemd/system")  # the standard targets (multi-user, network-online) verify resolves


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with its values in order (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def verify_root(root: Path) -> None:
    """Make ``root`` a file system root ``systemd-analyze verify --root`` can work in: this host's
    standard units beside kasou's (which the caller puts in ``root/lib/systemd/system``)."""
    dest = root / "lib" / "systemd" / "system"
    dest.mkdir(parents=True, exist_ok=True)
    for f in SYSTEM_UNITS.iterdir():
        target = dest / f.name
        if not target.exists() and not target.is_symlink():
            if f.is_symlink():
                target.symlink_to(f.readlink())
            elif f.is_dir():
                shutil.copytree(f, target, symlinks=True)
            else:
                shutil.copy2(f, target)


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: apt-get install systemd (scripts/install.sh does)"
    return subprocess.run(
        [exe, "verify", "--man=no", f"--root={root}", unit], capture_output=True, text=True, timeout=60
    )


FAKE_TOOL = """#!/bin/sh
# A stand-in for {name}: records its arguments; {name} is-active answers from $FAKE_ACTIVE.
echo "{name} $*" >> "$FAKE_LOG"
if [ "{name}" = systemctl ] && [ "$1" = --quiet ] && [ "$2" = is-active ]; then
    case " $FAKE_ACTIVE " in *" $3 "*) exit 0 ;; *) exit 3 ;; esac
fi
if [ "{name}" = deb-systemd-helper ] && [ "$1" = --quiet ] && [ "$2" = was-enabled ]; then
    case " $FAKE_ENABLED " in *" $3 "*) exit 0 ;; *) exit 1 ;; esac
fi
exit 0
"""


def fake_tools(bin_dir: Path) -> None:
    """Fake systemctl, deb-systemd-helper and deb-systemd-invoke in ``bin_dir``: they log to $FAKE_LOG."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("systemctl", "deb-systemd-helper", "deb-systemd-invoke"):
        p = bin_dir / name
        p.write_text(FAKE_TOOL.format(name=name))
        p.chmod(0o755)
