"""Generations copied to a real backup server (a ``kasou backup-server serve`` process on loopback) through the
API, with the fake driver and real qcow2 files: the copy after each backup (an incremental reads only its
changed chunks), the listing with locks, a restore from the server with the operator's key, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.control.backup_status import watch
from kasou.vault import policy
from kasou.vault.crypt import BackupKey
from kasou.vault.store import Store
from tests.functional.conftest import Env
from tests.functional.test_api_backups import backup, read_ok, write
from tests.vault_servers import Server, running, stop, writer_token


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running(tmp_path / "backup-servers", "bk1") as (s,):
        yield s


def key_json(key: BackupKey) -> dict[str, Any]:
    return dict(json.loads(key.to_json()))


def set_server(env: Env, server: Server, key: BackupKey, **over: Any) -> Any:
    body = {"url": server.url, "token": writer_token(server), "fingerprint": server.fingerprint,
            "public_key": json.loads(key.public().to_json()), **over}  # fmt: skip
    return env.api.put("/v1/backup-server", json=body)


def test_copies_on_the_server_and_a_restore_from_it(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    assert env.api.get("/v1/backup-server").json() is None
    r = set_server(env, server, key)
    assert r.status_code == 200, r.text
    assert r.json()["key_fingerprint"] == key.fingerprint and "token" not in r.text
    disk = env.create("emr", disk="16M")["disks"][0]["path"]
    write(disk, 0x11, "0")
    j1 = backup(env, "emr")
    assert j1["state"] == "succeeded", j1
    o1 = j1["result"]["offsite"]
    assert o1["generation"] == 1 and not o1["incremental"] and o1["bytes_sent"] > 0, j1
    write(disk, 0x22, "8M")
    j2 = backup(env, "emr", incremental=True)
    o2 = j2["result"]["offsite"]
    assert o2["incremental"] and o2["bytes_read"] == 4 << 20, o2  # the one 4 MiB chunk written since
    held = env.api.get("/v1/vms/emr/backups/server").json()
    assert [g["generation"] for g in held] == [1, 2] and all(g["locked_until"] for g in held), held

    shutil.rmtree(env.tmp / "backups")  # the host loses its own generations
    body = {"as": "emr-r", "from_server": True, "key": key_json(key)}
    r = env.api.post("/v1/vms/emr/backups/2/restore", json=body)
    assert r.status_code == 202, r.text
    j = env.wait(r.json()["job"])
    assert j["state"] == "succeeded", j
    got = env.api.get("/v1/vms/emr-r").json()
    assert got["state"] == "stopped" and (got["vcpus"], got["memory_mib"]) == (1, 128)
    assert read_ok(got["disks"][0]["path"], 0x11, "0") and read_ok(got["disks"][0]["path"], 0x22, "8M")


def test_bad_input_changes_nothing(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    env.create("emr")
    body = {"as": "emr-r", "from_server": True, "key": key_json(key)}
    r = env.api.post("/v1/vms/emr/backups/1/restore", json=body)
    assert r.status_code == 409 and "no backup server is set" in r.json()["message"], r.text
    r = set_server(env, server, key, fingerprint="00" * 32)
    assert r.status_code >= 400 and "certificate" in r.json()["message"], r.text
    r = set_server(env, server, key, token="not-a-token")
    assert r.status_code >= 400, r.text
    assert env.api.get("/v1/backup-server").json() is None
    assert set_server(env, server, key).status_code == 200
    assert backup(env, "emr")["state"] == "succeeded"
    r = env.api.post("/v1/vms/emr/backups/1/restore", json={**body, "key": key_json(BackupKey.generate())})
    assert r.status_code == 422 and "encrypted to key" in r.json()["message"], r.text
    r = env.api.post("/v1/vms/emr/backups/1/restore", json={"as": "emr-r", "from_server": True})
    assert r.status_code == 422 and "backup key" in r.json()["message"], r.text
    r = env.api.post("/v1/vms/emr/backups/9/restore", json=body)
    assert r.status_code == 404, r.text
    assert [v["name"] for v in env.api.get("/v1/vms").json()] == ["emr"]
    assert env.api.delete("/v1/backup-server").json() == {"removed": True}
    j = backup(env, "emr")
    assert j["state"] == "succeeded" and j["result"]["offsite"] is None, j


def test_a_copy_that_fails_keeps_the_generation_and_is_an_event(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    assert set_server(env, server, key).status_code == 200
    env.create("emr")
    stop(server)  # the backup server is unreachable at the next backup
    j = backup(env, "emr")
    assert j["state"] == "succeeded", j
    assert j["result"]["offsite"] is None and j["result"]["offsite_error"], j
    [g] = env.api.get("/v1/vms/emr/backups").json()
    assert g["offsite_error"] and g["offsite"] is None
    kinds = [e["kind"] for e in env.api.get("/v1/events").json()]
    assert "backup_offsite_failed" in kinds, kinds


def test_the_restore_plan_orders_by_priority_and_stops_before_a_time(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    assert set_server(env, server, key).status_code == 200
    env.create("pacs", priority=20)
    env.create("emr", priority=90)
    for vm in ("pacs", "emr"):
        assert backup(env, vm)["state"] == "succeeded"
    cut = time.time()
    time.sleep(0.05)
    assert backup(env, "emr")["state"] == "succeeded"
    plan = env.api.post("/v1/backup-server/restore-plan", json={"key": key_json(key)}).json()
    assert [(p["vm"], p["generation"], p["priority"]) for p in plan] == [("emr", 2, 90), ("pacs", 1, 20)], plan
    plan = env.api.post("/v1/backup-server/restore-plan", json={"key": key_json(key), "before": cut}).json()
    assert [(p["vm"], p["generation"]) for p in plan] == [("emr", 1), ("pacs", 1)], plan
    r = env.api.post("/v1/backup-server/restore-plan", json={"key": key_json(key), "vms": ["nope"]})
    assert r.status_code == 404 and "no generation of 'nope'" in r.json()["message"], r.text
    r = env.api.post("/v1/backup-server/restore-plan", json={"key": key_json(BackupKey.generate())})
    assert r.status_code == 422 and "encrypted to key" in r.json()["message"], r.text
    # Every VM back through the CLI, two at a time: the names must be free, so the VMs go first.
    for vm in ("pacs", "emr"):
        env.wait(env.api.delete(f"/v1/vms/{vm}", params={"force": True}).json()["job"])
    keyfile = env.tmp / "site.key"
    key.save(keyfile)
    out = cli(env, "backup", "restore-all", "--from-server", "--key", str(keyfile), "--parallel", "2", "--json")
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert sorted(r["vm"] for r in res["restored"]) == ["emr", "pacs"] and res["parallel"] == 2, res
    assert {v["name"]: v["state"] for v in env.api.get("/v1/vms").json()} == {"emr": "stopped", "pacs": "stopped"}
    bad = cli(env, "backup", "restore-all", "--from-server", "--key", str(keyfile), "--parallel", "2")
    assert bad.exit_code != 0 and "already exists" in bad.output and "0 of 2 VMs restored" in bad.output, bad.output


def cli(env: Env, *args: str) -> Any:
    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common
    from kasou.cli import main as cli_main
    from tests.functional.conftest import TOKEN

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        return CliRunner().invoke(cli_main.app, list(args), catch_exceptions=True)
    finally:
        common.client_factory = None


def test_status_says_which_vms_are_not_ok(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    env.create("emr")
    env.create("lab")
    assert backup(env, "emr")["state"] == "succeeded"
    rows = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}
    assert rows["emr"]["state"] == "ok" and rows["lab"]["state"] == "never", rows
    assert set_server(env, server, key).status_code == 200
    rows = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}
    assert rows["emr"]["state"] == "not_copied", rows  # made before the site had a backup server
    assert backup(env, "emr")["state"] == "succeeded"
    rows = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}
    assert rows["emr"]["state"] == "ok" and rows["emr"]["offsite_generation"] == 2 and rows["emr"]["locked_until"]
    # A second site pulled it and said so; the server verified it: the list and the status show both.
    site_b = Store(server.root).add_client("site-b", "reader")
    primary = server.client(site_b)
    primary.confirm("emr", 2)
    primary.close()
    policy.verify(Store(server.root), all_=True)
    gens = env.api.get("/v1/vms/emr/backups", params={"server": "true"}).json()
    g = gens[-1]
    assert (g["server_generation"], g["bytes_sent"] > 0, g["verified_at"] is not None) == (2, True, True), g
    assert [c["site"] for c in g["copied_to"]] == ["site-b"] and g["locked_until"] and g["time"] == g["created_at"]
    rows = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}
    assert rows["emr"]["verified_at"] and [c["site"] for c in rows["emr"]["copied_to"]] == ["site-b"], rows
    # The policy asks a longer lock than the backup server gives (30 days): said, with the server's command.
    assert env.api.patch("/v1/vms/emr/backup-policy", json={"lock_days": 60}).status_code == 200
    row = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}["emr"]
    assert row["state"] == "lock_short" and "kasou backup-server policy set --vm emr --lock-days 60" in row["reason"]
    # The hourly watch says it once, as an event.
    backups, portal = env.services.vms.backups, env.api.portal  # type: ignore[attr-defined]
    assert portal.call(watch, backups) == ["backup_lock_short"] and portal.call(watch, backups) == []
    ev = env.api.get("/v1/events", params={"subject": "vm/emr"}).json()
    assert ev[-1]["kind"] == "backup_lock_short" and ev[-1]["severity"] == "warning", ev
    assert env.api.patch("/v1/vms/emr/backup-policy", json={"lock_days": 30}).status_code == 200
    assert {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}["emr"]["state"] == "ok"
    # The backup server cannot be reached: what it holds is not known, and said so.
    stop(server)
    row = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}["emr"]
    assert row["state"] == "unknown" and "could not be asked" in row["reason"], row
    assert portal.call(watch, backups) == ["backup_server_unreachable"] and portal.call(watch, backups) == []
    gens = env.api.get("/v1/vms/emr/backups", params={"server": "true"}).json()
    assert "could not be asked" in gens[-1]["server_error"] and gens[-1]["verified_at"] is None


def test_a_restore_drill_boots_each_copy_on_an_isolated_network_and_removes_it(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    assert set_server(env, server, key).status_code == 200
    env.create("emr", priority=90)
    env.create("lab")
    for vm in ("emr", "lab"):
        assert backup(env, vm)["state"] == "succeeded"
    env.driver.guest_programs["/usr/bin/psql"] = (0, "1\n", "")
    env.driver.agents_answer = True
    body = {"key": key_json(key), "check": {"emr": ["/usr/bin/psql", "-c", "select 1"]}}
    r = env.api.post("/v1/backup-server/drill", json=body)
    assert r.status_code == 202, r.text
    j = env.wait(r.json()["job"])
    assert j["state"] == "succeeded" and j["result"]["ok"], [d["error"] for d in j["result"]["drills"]]
    drills = {d["vm"]: d for d in j["result"]["drills"]}
    assert drills["emr"]["ok"] and drills["emr"]["check"]["stdout"] == "1\n" and drills["lab"]["check"] is None
    assert env.driver.guest_runs == [("drill-emr", ["/usr/bin/psql", "-c", "select 1"])]
    nets = {n["name"]: n for n in env.api.get("/v1/networks").json()}
    assert nets["drill"]["isolated"] and nets["drill"]["vms"] == []
    assert sorted(v["name"] for v in env.api.get("/v1/vms").json()) == ["emr", "lab"]  # the copies are gone
    status = {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}
    assert status["emr"]["drill_ok"] is True and status["emr"]["drill_at"]
    # the whole latest drill, as the web UI's backups card shows it: generation, when, how long, the check
    d = status["emr"]["drill"]
    assert d["ok"] and d["at"] == status["emr"]["drill_at"] and d["generation"] == 1 and d["error"] is None, d
    assert d["restore_s"] is not None and d["boot_s"] is not None
    assert d["check"]["exitcode"] == 0 and d["check"]["stdout"] == "1\n"
    assert status["lab"]["drill"]["ok"] and status["lab"]["drill"]["check"] is None
    kinds = [e["kind"] for e in env.api.get("/v1/events").json()]
    assert kinds.count("backup_drill") == 2, kinds

    # A failing check fails the drill (and says why); a network that is not isolated is refused up front.
    env.driver.guest_programs["/usr/bin/psql"] = (2, "", 'FATAL: database "emr" does not exist\n')
    j = env.wait(env.api.post("/v1/backup-server/drill", json={**body, "vms": ["emr"]}).json()["job"])
    [d] = j["result"]["drills"]
    assert not d["ok"] and "exited with 2" in d["error"] and "does not exist" in d["error"], d
    shown = {s["vm"]: s["drill"] for s in env.api.get("/v1/backups/status").json()}
    assert (
        shown["emr"]["ok"] is False and shown["emr"]["error"] == d["error"] and shown["emr"]["check"]["exitcode"] == 2
    )
    assert shown["lab"]["ok"]  # its own latest drill stays
    assert env.api.post("/v1/networks", json={"name": "clinical"}).status_code == 201
    r = env.api.post("/v1/backup-server/drill", json={**body, "network": "clinical"})
    assert r.status_code == 422 and "not isolated" in r.json()["message"], r.text
    r = env.api.post("/v1/backup-server/drill", json={**body, "check": {"pacs": ["/bin/true"]}})
    assert r.status_code == 404 and "pacs" in r.json()["message"], r.text


def test_one_file_comes_back_from_a_generation(env: Env, server: Server, tmp_path: Path) -> None:
    key = BackupKey.generate()
    assert set_server(env, server, key).status_code == 200
    disk = env.create("emr", disk="32M")["disks"][0]["path"]
    tree = tmp_path / "tree"
    (tree / "srv/ward").mkdir(parents=True)
    (tree / "srv/ward/handover.txt").write_text("bed 12: allergy to penicillin\n")
    fs = tmp_path / "fs.raw"
    subprocess.run(["truncate", "-s", "32M", str(fs)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs)], check=True, timeout=60)
    Path(disk).unlink()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(fs), disk], check=True, timeout=60)
    assert backup(env, "emr")["state"] == "succeeded"
    body = {"path": "/srv/ward/handover.txt", "key": key_json(key)}
    r = env.api.post("/v1/vms/emr/backups/1/file", json=body)
    assert r.status_code == 200 and r.content == b"bed 12: allergy to penicillin\n", r.text
    r = env.api.post("/v1/vms/emr/backups/1/file", json={**body, "path": "/srv/none"})
    assert r.status_code == 404 and "not in its file systems" in r.json()["message"], r.text
    r = env.api.post("/v1/vms/emr/backups/1/file", json={**body, "path": "../etc/shadow"})
    assert r.status_code == 422, r.text
    r = env.api.post("/v1/vms/emr/backups/1/file", json={**body, "key": key_json(BackupKey.generate())})
    assert r.status_code == 422 and "encrypted to key" in r.json()["message"], r.text
    assert list((env.tmp / "backups" / ".scratch").glob("file-*")) == []  # the scratch copy is gone


def test_isolating_the_backup_server_stops_every_copy_until_rejoin(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    assert set_server(env, server, key).status_code == 200
    env.create("emr")
    assert env.api.post("/v1/backup-server/isolate", json={}).json()["isolated"] is True
    j = backup(env, "emr")
    assert j["state"] == "succeeded" and "isolated" in j["result"]["offsite_error"], j["result"]
    r = env.api.post("/v1/vms/emr/backups/1/restore", json={"as": "x", "from_server": True, "key": key_json(key)})
    assert r.status_code == 409 and "isolated" in r.json()["message"], r.text
    assert env.api.post("/v1/backup-server/isolate", json={"rejoin": True}).json()["isolated"] is False
    assert backup(env, "emr")["result"]["offsite"]["generation"] == 2
    kinds = [e["kind"] for e in env.api.get("/v1/events").json()]
    assert "backup_server_isolated" in kinds and "backup_server_rejoined" in kinds, kinds


def test_a_reader_token_serves_restores_and_copies_nothing(env: Env, server: Server) -> None:
    key = BackupKey.generate()
    reader = Store(server.root).add_client("site-b-restore", "reader")
    r = set_server(env, server, key, token=reader)
    assert r.status_code == 200 and r.json()["role"] == "reader", r.text
    ev = env.api.get("/v1/events", params={"subject": "site"}).json()
    assert ev[-1]["severity"] == "warning" and "no backup is copied there" in ev[-1]["message"], ev
    env.create("emr")
    j = backup(env, "emr")
    assert j["state"] == "succeeded" and "reader token" in j["result"]["offsite_error"], j
    assert {s["vm"]: s for s in env.api.get("/v1/backups/status").json()}["emr"]["state"] == "not_copied"
