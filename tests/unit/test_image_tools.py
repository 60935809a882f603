"""kasou.image.tools: how recipes run their tools."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kasou.errors import ImageError
from kasou.image.tools import mounts_under, run, run_streaming


def test_run_gives_one_line_and_the_package_of_a_missing_tool() -> None:
    assert run(["sh", "-c", "cat"], stdin="hello\n") == "hello\n"
    with pytest.raises(ImageError, match=r"'sh -c' failed: second"):
        run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"])
    assert run(["sh", "-c", "exit 3"], ok=(0, 3)) == ""
    with pytest.raises(ImageError, match=r"'/nonexistent/mmdebstrap' is not installed \(apt-get install mmdebstrap\)"):
        run(["/nonexistent/mmdebstrap"])


def test_run_streaming_hands_every_line_and_fails_with_the_last() -> None:
    lines: list[str] = []
    run_streaming(["sh", "-c", "echo one; echo two >&2"], timeout=30, on_line=lines.append)
    assert lines == ["one", "two"]
    with pytest.raises(ImageError, match="'sh -c' failed: E: no such suite"):
        run_streaming(["sh", "-c", "echo 'E: no such suite'; exit 1"], timeout=30, on_line=lines.append)


def test_run_streaming_kills_the_whole_group_at_its_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="timed out after 1 s"):
        run_streaming(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; wait"], timeout=1,
                      on_line=lambda _line: None)  # fmt: skip
    assert time.monotonic() - t0 < 20
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{child}/stat").read_text() if Path(f"/proc/{child}").exists() else ""
        if stat and stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{child}").exists(), "the tool's child outlived the timeout"


def test_mounts_under() -> None:
    assert "/" in mounts_under(Path("/"))
    assert mounts_under(Path("/proc")) and mounts_under(Path("/proc"))[-1] == "/proc"  # deepest first
    assert mounts_under(Path(os.path.realpath("/nonexistent-dir"))) == []
