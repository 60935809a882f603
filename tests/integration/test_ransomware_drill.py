"""The ransomware drill, through the CLI with real QEMU, the tiny guests' writers and two real backup servers.

Three VMs are backed up twice (copies on backup server A), and a restore drill boots each copy on an isolated
network. Then the attacker, holding root on the hypervisor
and kasou's administrator token, tries everything the hypervisor can reach: the backup server's API with the
host's own token (delete, overwrite, re-add, a generation encrypted to the attacker's key), re-keying the
site through kasou's API, the backup server's files (immutable), and finally overwrites every VM disk with
random bytes and deletes the host's own generations. Every VM is then restored from A's newest generation
from before the attack, in HA-priority order, and boots with the counter of that generation; then again
from the second site B (which pulled from A) with A gone. Nothing on the servers is readable.

A few minutes (three guests restored twice): a scenario, run before an issue about backups is resolved, under the
machine's QEMU lock: ``flock /tmp/kasou-qemu.lock .venv/bin/pytest -s -m scenario tests/integration/test_ransomware_drill.py``.
The default suite keeps ``test_backup_server.py`` (one guest: copy, incremental, restore after the host lost it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kasou.vault import immutable
from kasou.vault.crypt import BackupKey
from tests.integration.conftest import Kasou
from tests.vault_servers import Server, running, stop, writer_token
from tests.vault_servers import kasou as kasou_cmd

pytestmark = [pytest.mark.qemu, pytest.mark.scenario, pytest.mark.timeout(1200)]

VMS = {"emr": 90, "lab": 60, "pacs": 30}  # name: HA priority (restored highest first)


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    with running(tmp_path / "backup-servers", "site-a", "site-b") as (a, b):
        yield a, b


def server_cmd(server: Server, *args: str) -> str:
    r = kasou_cmd("backup-server", *args, "--dir", str(server.root))
    assert r.returncode == 0, r.stderr
    return r.stdout


def reader_token(server: Server, name: str) -> str:
    return server_cmd(server, "client", "add", name, "--role", "reader").split("token ")[1].split()[0]


def recovered(k: Kasou, vm: str) -> int:
    line = k.wait_for(f"{vm} to say recovered", lambda: next(
        (ln for ln in k.log(vm).splitlines() if ln.startswith("recovered ")), None))  # fmt: skip
    return int(line.split()[1])


def restore_all(k: Kasou, key: Path, before: float) -> float:
    for vm in VMS:
        k.run("vm", "delete", vm, "--force")
    t0 = time.monotonic()
    out = k.run("backup", "restore-all", "--from-server", "--key", str(key), "--before", str(before), "--start",
                timeout=900).stdout  # fmt: skip
    took = time.monotonic() - t0
    order = [ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.startswith("vm ") and "restored" in ln]
    assert order == list(VMS), out  # highest priority first
    return took


def test_ransomware_drill(kasou: Kasou, sites: tuple[Server, Server], tmp_path: Path) -> None:
    k = kasou
    a, b = sites
    key = tmp_path / "site.key"
    k.run("backup", "key", "create", "--out", str(key))
    fingerprint = json.loads(Path(f"{key}.pub").read_text())["fingerprint"]
    for s in (a, b):
        server_cmd(s, "key", "allow", fingerprint)
    token = writer_token(a)  # the hypervisor's: the attacker has it too
    k.run("backup", "server", "set", "--url", a.url, "--token", token, "--fingerprint", a.fingerprint,
          "--public-key", f"{key}.pub")  # fmt: skip

    for vm, prio in VMS.items():
        k.run("vm", "create", vm, "--image", "tiny", "--memory", "128", "--priority", str(prio), "--start")
    for vm in VMS:
        k.wait_ready(vm)
    bounds: dict[str, tuple[int, int]] = {}
    for incremental in (False, True):
        for vm in VMS:
            k.wait_for(f"{vm} writing", lambda vm=vm: len(k.seqs(vm)) >= 5)
            lo = max(k.seqs(vm))
            out = k.run("backup", "create", vm, *(["--incremental"] if incremental else []), timeout=300).stdout
            assert "copied to the backup server" in out, out
            bounds[vm] = (lo, max(k.seqs(vm)) + 1)
    # The routine restore drill: every VM's newest copy boots on an isolated network, and is removed.
    out = k.run("backup", "drill", "--key", str(key), timeout=900).stdout
    assert out.count("passed") == len(VMS), out
    assert next(n for n in k.json("network", "list") if n["name"] == "drill")["isolated"]
    assert sorted(v["name"] for v in k.json("vm", "list")) == sorted(VMS)
    time.sleep(1.0)
    attack = time.time()

    # -- the attacker: the hypervisor's token on the backup server's API ------------------------------
    [gen2] = [g for g in k.json("backup", "list", "emr", "--server") if g["generation"] == 2]
    http = httpx.Client(base_url=a.url, verify=False, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    index = http.get("/v1/generations/emr/2").json()
    cid = next(c for c in index["disks"][0]["chunks"] if c)
    before = http.get(f"/v1/chunks/{cid}").content
    for method, path in (("DELETE", "/v1/generations/emr/2"), ("DELETE", f"/v1/chunks/{cid}"),
                         ("PUT", "/v1/generations/emr/2"), ("PATCH", "/v1/generations/emr/2"),
                         ("POST", "/v1/policy"), ("DELETE", "/v1/generations")):  # fmt: skip
        assert http.request(method, path).status_code in (404, 405), (method, path)
    garbage = b"KSC1" + os.urandom(len(before) - 4)
    assert http.put(f"/v1/chunks/{cid}", content=garbage).status_code == 200
    assert http.get(f"/v1/chunks/{cid}").content == before  # not replaced
    fields = {f: index[f] for f in ("vm", "vm_uuid", "created", "key_fingerprint", "chunk_size", "config",
                                    "bytes_sent", "bytes_logical")}  # fmt: skip
    again = {**fields, "generation": 2, "disks": [{"disk_id": d["disk_id"], "size": d["size"], "chunks": d["chunks"]}
                                                   for d in index["disks"]]}  # fmt: skip
    assert http.post("/v1/generations", json=again).status_code == 409  # no overwrite
    rekeyed = {**again, "generation": 3, "key_fingerprint": BackupKey.generate().fingerprint}
    assert http.post("/v1/generations", json=rekeyed).status_code == 403  # not the site's key
    http.close()

    # -- the administrator token: re-key the site, then a backup -> refused by the server, loudly ------
    evil = tmp_path / "evil.key"
    k.run("backup", "key", "create", "--out", str(evil))
    k.run("backup", "server", "set", "--url", a.url, "--token", token, "--fingerprint", a.fingerprint,
          "--public-key", f"{evil}.pub")  # fmt: skip
    out = k.run("backup", "create", "emr", timeout=300).stdout
    assert "not copied to the backup server" in out and "does not accept" in out, out
    assert "backup_offsite_failed" in [e["kind"] for e in k.json("event", "list", "--subject", "vm/emr")]

    # -- root on the hypervisor: the backup server's files are immutable; then the disks are destroyed ----
    assert immutable.probe(a.root / "chunks"), "this machine's /tmp keeps chattr +i (ext4): the drill relies on it"
    chunk = a.root / "chunks" / cid[:4] / cid  # a chunk of generation 2 (chunks of no generation are not locked)
    with pytest.raises(PermissionError):
        chunk.unlink()
    with pytest.raises(PermissionError):
        chunk.write_bytes(b"encrypted by the attacker")
    for vm in VMS:
        disk = Path(k.vm(vm)["disks"][0]["path"])
        with disk.open("r+b") as f:
            f.write(os.urandom(disk.stat().st_size))
    shutil.rmtree(k.paths.backups)
    stored = b"".join(p.read_bytes() for p in (a.root / "chunks").rglob("*") if p.is_file())
    assert b"recovered" not in stored and b"KASOU-READY" not in stored  # only ciphertext on the server

    # -- recovery from site A: every VM, from its newest generation before the attack -------------------
    took_a = restore_all(k, key, attack)
    for vm, (lo, hi) in bounds.items():
        assert lo <= recovered(k, vm) <= hi, (vm, lo, hi)
    assert gen2["locked_until"] > attack + 86_400

    # -- the second site pulled from A; A is gone; everything comes back from B ---------------------------
    server_cmd(b, "sync", "--from", a.url, "--token", reader_token(a, "site-b"), "--fingerprint", a.fingerprint)
    stop(a)
    k.run("backup", "server", "set", "--url", b.url, "--token", reader_token(b, "restore"), "--fingerprint",
          b.fingerprint, "--public-key", f"{key}.pub")  # fmt: skip
    took_b = restore_all(k, key, attack)
    for vm, (lo, hi) in bounds.items():
        assert lo <= recovered(k, vm) <= hi, (vm, lo, hi)
    print(
        f"restore of {len(VMS)} VMs (tiny guests) and their start: from site A {took_a:.1f} s, "
        f"from site B {took_b:.1f} s"
    )
    for vm in VMS:
        k.run("vm", "delete", vm, "--force")
