"""What the ``kasou`` command line says when it fails, as its tests read it back."""

from __future__ import annotations

from typing import Any


def error_of(result: Any) -> str:
    """The one line ``kasou`` printed after ``error:`` on stderr (a kasou error, kasou.cli.output.KasouGroup)."""
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return str(lines[0][len("error: ") :])
