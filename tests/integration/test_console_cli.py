"""``kasou vm console`` and ``kasou vm log --follow`` on a real VM, through the API and the agent, as a script
uses them (standard input is not a terminal). The tiny guest keeps a shell on its serial port."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.integration.conftest import KASOU, Kasou

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


def test_a_script_runs_a_command_on_the_serial_console_and_follows_the_log(kasou: Kasou) -> None:
    kasou.run("vm", "create", "emr", "--image", "tiny", "--start")
    kasou.wait_ready("emr")
    t0 = time.monotonic()
    r = subprocess.run([*KASOU, "vm", "console", "emr", "--linger", "3", "--timeout", "60"],
                       input="echo kasou-serial-$((40+2))\n", env=kasou.env, capture_output=True, text=True,
                       timeout=90)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "kasou-serial-42" in r.stdout, r.stdout[-2000:]
    assert time.monotonic() - t0 < 30, "the console did not end after its input and --linger"  # not at --timeout
    records = kasou.json("audit", "list", "--action", "console_close")
    assert records and records[-1]["details"]["kind"] == "serial", records[-1:]
    follow = subprocess.Popen([*KASOU, "vm", "log", "emr", "--follow", "--bytes", "200"], env=kasou.env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(2)  # it has shown the log's end, and polls
        r = subprocess.run([*KASOU, "vm", "console", "emr", "--linger", "2", "--timeout", "30"],
                           input="echo follow-$((6*7))\n", env=kasou.env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 0 and "follow-42" in r.stdout, (r.stdout[-500:], r.stderr)
        time.sleep(2)
    finally:
        follow.terminate()
        out, _ = follow.communicate(timeout=30)
    assert "follow-42" in out, out[-2000:]
