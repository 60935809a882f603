"""Backups copied to a real backup server (``kasou backup-server serve``, its own TLS identity), through the
CLI, with real QEMU and the tiny guest's writer.

A site backup key is made (the private part stays with the operator); each generation of a running VM is
copied, encrypted, after it is made (the incremental reads only the chunks it changed); the server holds only
ciphertext, locked; then the host loses the VM and every local generation (as after ransomware), and the VM is
restored from the server with the operator's key: it boots with the counter of its generation. A wrong key is
refused before anything is made.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Kasou
from tests.vault_servers import Server, running, writer_token

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.shares_machine,
]  # beside the fast tests (scripts/test.sh): tiny guests, no timing


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running(tmp_path / "backup-servers", "bk1") as (s,):
        yield s


def test_generations_on_the_backup_server_restore_after_the_host_lost_them(
    kasou: Kasou, server: Server, tmp_path: Path
) -> None:
    k = kasou
    key = tmp_path / "site.key"
    made = k.run("backup", "key", "create", "--out", str(key)).stdout
    assert "KASOU-BK1-" in made and oct(key.stat().st_mode & 0o777) == "0o600", made
    k.run("backup", "server", "set", "--url", server.url, "--token", writer_token(server), "--fingerprint",
          server.fingerprint, "--public-key", f"{key}.pub")  # fmt: skip
    assert k.json("backup", "server", "show")["url"] == server.url

    k.run("vm", "create", "emr", "--image", "tiny", "--memory", "128", "--start")
    k.wait_ready("emr")
    k.wait_for("some writes", lambda: len(k.seqs("emr")) >= 5)
    first = k.run("backup", "create", "emr", timeout=300).stdout
    assert "copied to the backup server" in first and "whole disks" in first, first
    n = max(k.seqs("emr"))
    k.wait_for("more writes", lambda: max(k.seqs("emr")) >= n + 10)
    lo = max(k.seqs("emr"))
    second = k.run("backup", "create", "emr", "--incremental", timeout=300).stdout
    hi = max(k.seqs("emr")) + 1
    assert "copied to the backup server" in second and "changed chunks only" in second, second

    held = k.json("backup", "list", "emr", "--server")
    assert [g["generation"] for g in held] == [1, 2], held
    assert all(g["locked_until"] > time.time() + 86_400 for g in held), held
    local = k.json("backup", "list", "emr")
    assert local[1]["offsite"]["bytes_read"] < local[0]["offsite"]["bytes_read"], local
    stored = b"".join(p.read_bytes() for p in (server.root / "chunks").rglob("*") if p.is_file())
    assert b"KASOU-READY" not in stored and b"recovered" not in stored  # ciphertext only

    # The host loses the VM and every generation it kept.
    k.run("vm", "delete", "emr", "--force")
    shutil.rmtree(k.paths.backups)

    other = tmp_path / "other.key"
    k.run("backup", "key", "create", "--out", str(other))
    bad = k.run("backup", "restore", "emr", "2", "--as", "emr2", "--from-server", "--key", str(other), check=False)
    assert bad.returncode == 2 and "encrypted to key" in bad.stderr, bad.stderr  # refused input
    assert [v["name"] for v in k.json("vm", "list")] == []

    k.run("backup", "restore", "emr", "2", "--as", "emr2", "--from-server", "--key", str(key), timeout=300)
    k.run("vm", "start", "emr2")
    line = k.wait_for("emr2 to say recovered", lambda: next(
        (ln for ln in k.log("emr2").splitlines() if ln.startswith("recovered ")), None))  # fmt: skip
    assert lo <= int(line.split()[1]) <= hi, (lo, line, hi)
    k.run("vm", "delete", "emr2", "--force")
