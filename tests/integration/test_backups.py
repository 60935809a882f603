"""The issue's backup test, through the CLI with a real guest writing: full backup, writes, incremental,
more writes, incremental; each generation restored as a new VM boots with the ``recovered N`` of its moment;
retention prunes and the remaining generations still restore.

Run under the machine's QEMU lock: ``flock /tmp/kasou-qemu.lock .venv/bin/pytest tests/integration/test_backups.py``.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Kasou

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
    pytest.mark.timeout(600),
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing


def take(k: Kasou, incremental: bool) -> tuple[int, int]:
    """Back up ``emr``; (last seq acknowledged before it started, first seq after it finished)."""
    lo = max(k.seqs("emr"))
    k.run("backup", "create", "emr", *(["--incremental"] if incremental else []), timeout=300)
    return lo, max(k.seqs("emr")) + 1


def recovered(k: Kasou, gen: int, name: str) -> int:
    k.run("backup", "restore", "emr", str(gen), "--as", name, timeout=300)
    k.run("vm", "start", name)
    line = k.wait_for(
        f"{name} to say recovered",
        lambda: next((ln for ln in k.log(name).splitlines() if ln.startswith("recovered ")), None),
        timeout=90,
    )
    k.run("vm", "delete", name, "--force")
    return int(line.split()[1])


def test_generations_restore_to_their_moment_and_retention(kasou: Kasou) -> None:
    k = kasou
    k.run("vm", "create", "emr", "--image", "tiny", "--start")
    k.wait_ready("emr")
    k.wait_for("a few writes", lambda: len(k.seqs("emr")) >= 5)
    moments = [take(k, incremental=False)]
    k.wait_for("more writes", lambda: max(k.seqs("emr")) >= moments[-1][1] + 15)
    moments.append(take(k, incremental=True))
    k.wait_for("more writes", lambda: max(k.seqs("emr")) >= moments[-1][1] + 15)
    moments.append(take(k, incremental=True))
    gens = k.json("backup", "list", "emr")
    assert [(g["generation"], g["kind"], g["based_on"]) for g in gens] == [
        (1, "full", None), (2, "incremental", 1), (3, "incremental", 2)
    ], gens  # fmt: skip
    assert all(g["running"] for g in gens)
    assert gens[1]["bytes_copied"] < gens[0]["bytes_copied"] / 4, gens  # only what changed
    for gen, (lo, hi) in enumerate(moments, 1):
        n = recovered(k, gen, f"emr-r{gen}")
        print(f"\n[backup] generation {gen}: acknowledged {lo} before, recovered {n}, next after {hi}")
        assert lo <= n <= hi, (gen, lo, n, hi)
    assert k.vm("emr")["state"] == "running" and k.vm("emr")["guest_ready"]  # never stopped
    # Retention: keep 2; the next backup prunes generations 1 and 2, and 3 becomes self-contained.
    k.run("backup", "schedule", "emr", "--keep", "2")
    moments.append(take(k, incremental=True))
    gens = k.json("backup", "list", "emr")
    assert [(g["generation"], g["based_on"]) for g in gens] == [(3, None), (4, 3)], gens
    for gen in (3, 4):
        lo, hi = moments[gen - 1]
        n = recovered(k, gen, f"emr-k{gen}")
        assert lo <= n <= hi, (gen, lo, n, hi)
    # Bad input: one line, nothing changed.
    for args, text, code in (
        (("backup", "restore", "emr", "1", "--as", "x1"), "no backup generation 1", 3),
        (("backup", "restore", "emr", "3", "--as", "emr"), "already exists", 4),
        (("backup", "restore", "nope", "1", "--as", "x1"), "no VM named 'nope'", 3),
        (("backup", "schedule", "emr", "--keep", "0"), "between 1 and 1000", 2),
    ):
        r = k.run(*args, check=False)
        assert r.returncode == code and text in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert [v["name"] for v in k.json("vm", "list")] == ["emr"]
