"""Backups through the API with the fake driver and real qcow2 files: generations, restore, retention,
bad input, a damaged backup, a failed backup and schedules (with events)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from kasou.model.timeofday import last_slot
from tests.functional.conftest import Env


def backup(env: Env, vm: str, incremental: bool = False) -> dict[str, Any]:
    r = env.api.post(f"/v1/vms/{vm}/backups", json={"incremental": incremental})
    assert r.status_code == 202, r.text
    return env.wait(r.json()["job"])


def restore(env: Env, vm: str, gen: int, new: str) -> dict[str, Any]:
    r = env.api.post(f"/v1/vms/{vm}/backups/{gen}/restore", json={"as": new})
    assert r.status_code == 202, r.text
    return env.wait(r.json()["job"])


def write(disk: str, pattern: int, offset: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 64k", disk], check=True,
                   capture_output=True)  # fmt: skip


def read_ok(disk: str, pattern: int, offset: str) -> bool:
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {pattern} {offset} 64k", disk],
                       capture_output=True, text=True)  # fmt: skip
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def backup_files(env: Env) -> list[Path]:
    return sorted((env.tmp / "backups").rglob("*.qcow2"))


def test_generations_and_restore_as_a_new_vm(env: Env) -> None:
    vm = env.create("emr")
    disk = vm["disks"][0]["path"]
    write(disk, 0x11, "0")
    j1 = backup(env, "emr", incremental=True)
    assert j1["state"] == "succeeded", j1
    assert j1["result"]["kind"] == "full" and "no earlier generation" in j1["result"]["note"]
    write(disk, 0x22, "512k")
    j2 = backup(env, "emr", incremental=True)  # stopped: compared with generation 1
    assert j2["result"]["kind"] == "incremental", j2
    assert env.act("emr", "start")["state"] == "succeeded"
    j3 = backup(env, "emr", incremental=True)  # running: the bitmap the stopped backup left
    assert j3["result"]["kind"] == "incremental", j3
    gens = env.api.get("/v1/vms/emr/backups").json()
    assert [(g["generation"], g["kind"], g["based_on"]) for g in gens] == [
        (1, "full", None), (2, "incremental", 1), (3, "incremental", 2)
    ]  # fmt: skip
    assert all(len(g["disks"][0]["digest"]) > 20 for g in gens)
    j = restore(env, "emr", 1, "emr-r1")
    assert j["state"] == "succeeded", j
    r1 = env.api.get("/v1/vms/emr-r1").json()
    src = env.api.get("/v1/vms/emr").json()
    assert r1["state"] == "stopped" and (r1["vcpus"], r1["memory_mib"], r1["image"]) == (1, 128, "tiny")
    assert r1["nics"][0]["mac"] != src["nics"][0]["mac"] and r1["disks"][0]["path"] != disk
    assert read_ok(r1["disks"][0]["path"], 0x11, "0") and not read_ok(r1["disks"][0]["path"], 0x22, "512k")
    assert restore(env, "emr", 2, "emr-r2")["state"] == "succeeded"
    r2 = env.api.get("/v1/vms/emr-r2").json()
    assert read_ok(r2["disks"][0]["path"], 0x22, "512k")
    hist = env.api.get("/v1/vms/emr-r2/history").json()
    assert "restored from backup generation 2 of VM emr" in hist[0]["detail"]


def test_bad_input_changes_nothing(env: Env) -> None:
    env.create("lab")
    assert backup(env, "lab")["state"] == "succeeded"
    env.create("pacs")
    before = (env.api.get("/v1/vms").json(), backup_files(env))
    cases = [
        (env.api.post("/v1/vms/lab/backups/7/restore", json={"as": "new1"}), 404, "no backup generation 7"),
        (env.api.post("/v1/vms/lab/backups/1/restore", json={"as": "pacs"}), 409, "already exists"),
        (env.api.post("/v1/vms/lab/backups/1/restore", json={"as": "Bad Name"}), 422, "name"),
        (env.api.post("/v1/vms/nope/backups/1/restore", json={"as": "new1"}), 404, "no VM named 'nope'"),
        (env.api.post("/v1/vms/nope/backups", json={}), 404, "no VM named 'nope'"),
        (env.api.get("/v1/vms/nope/backups"), 404, "no VM named 'nope'"),
        (env.api.patch("/v1/vms/lab/backup-policy", json={"keep": 0}), 422, "between 1 and 1000"),
        (env.api.patch("/v1/vms/lab/backup-policy", json={"daily": "25:00"}), 422, "HH:MM"),
        (env.api.patch("/v1/vms/nope/backup-policy", json={"keep": 3}), 404, "no VM named"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (r.status_code, r.text)
        body = r.json()
        assert text in body["message"] and "\n" not in body["message"], body
    assert (env.api.get("/v1/vms").json(), backup_files(env)) == before
    assert env.api.get("/v1/vms/lab/backup-policy").json()["keep_is_default"] is True


def test_damaged_backup_is_refused_and_nothing_is_made(env: Env) -> None:
    vm = env.create("ris")
    write(vm["disks"][0]["path"], 0x33, "0")
    assert backup(env, "ris")["state"] == "succeeded"
    f = backup_files(env)[0]
    data = bytearray(f.read_bytes())
    start = data.find(bytes([0x33]) * 4096)
    assert start > 0
    data[start : start + 16] = b"\0" * 16
    f.write_bytes(bytes(data))
    j = restore(env, "ris", 1, "ris-r")
    assert j["state"] == "failed" and j["error"]["code"] == "backup_corrupt", j
    assert "damaged backup" in j["error"]["message"]
    assert env.api.get("/v1/vms/ris-r").status_code == 404
    assert not (env.tmp / "disks" / "ris-r").exists()


def test_failed_backup_leaves_no_file_no_record_and_is_an_event(env: Env) -> None:
    env.create("pharm", start=True)
    env.driver.fail_next_backup = "No space left on device"
    j = backup(env, "pharm")
    assert j["state"] == "failed" and "No space left" in j["error"]["message"]
    assert env.api.get("/v1/vms/pharm/backups").json() == []
    assert backup_files(env) == []
    ev = env.api.get("/v1/events", params={"subject": "vm/pharm"}).json()
    assert [(e["kind"], e["severity"]) for e in ev] == [("backup_failed", "error")]
    assert backup(env, "pharm", incremental=True)["result"]["kind"] == "full"  # and the next one works


def test_missing_bitmap_makes_a_full_backup_and_says_so(env: Env) -> None:
    env.create("bill", start=True)
    backup(env, "bill")
    env.driver.drop_bitmaps("bill")
    j = backup(env, "bill", incremental=True)
    assert j["result"]["kind"] == "full" and "bitmap" in j["result"]["note"], j["result"]


def test_retention_merges_and_the_rest_still_restore(env: Env) -> None:
    vm = env.create("nutr")
    disk = vm["disks"][0]["path"]
    r = env.api.patch("/v1/vms/nutr/backup-policy", json={"keep": 2})
    assert r.status_code == 200 and r.json()["keep"] == 2
    for i in range(4):
        write(disk, 0x40 + i, f"{i * 128}k")
        j = backup(env, "nutr", incremental=True)
        assert j["state"] == "succeeded", j
    assert j["result"]["pruned"] == [2]
    gens = env.api.get("/v1/vms/nutr/backups").json()
    assert [(g["generation"], g["based_on"]) for g in gens] == [(3, None), (4, 3)]
    assert len(backup_files(env)) == 2
    for gen in (3, 4):
        assert restore(env, "nutr", gen, f"nutr-g{gen}")["state"] == "succeeded"
        path = env.api.get(f"/v1/vms/nutr-g{gen}").json()["disks"][0]["path"]
        assert all(read_ok(path, 0x40 + i, f"{i * 128}k") for i in range(gen))
        assert not read_ok(path, 0x40 + gen, f"{gen * 128}k")


def test_schedule_runs_when_due_and_reports_missed_and_late(env: Env) -> None:
    env.create("emr", start=True)
    backups = env.services.vms.backups
    portal = env.api.portal  # type: ignore[attr-defined]
    now = [time.time()]
    backups.clock = lambda: now[0]
    due = time.strftime("%H:%M", time.localtime(now[0] + 120))
    r = env.api.patch("/v1/vms/emr/backup-policy", json={"daily": due, "keep": 3})
    assert r.status_code == 200 and r.json()["daily"] == due
    portal.call(backups.tick)
    assert env.api.get("/v1/vms/emr/backups").json() == []  # not due yet
    now[0] = last_slot(due, now[0] + 180) + 5
    portal.call(backups.tick)
    deadline = time.monotonic() + 10
    while not env.api.get("/v1/vms/emr/backups").json() and time.monotonic() < deadline:
        time.sleep(0.05)
    gens = env.api.get("/v1/vms/emr/backups").json()
    assert len(gens) == 1 and gens[0]["scheduled"], gens
    portal.call(backups.tick)  # the same slot never runs twice
    time.sleep(0.2)
    assert len(env.api.get("/v1/vms/emr/backups").json()) == 1
    # The control plane was down a day and two hours: the slot runs late, with a warning.
    now[0] += 86400 + 7200
    portal.call(backups.tick)
    ev = env.api.get("/v1/events", params={"subject": "vm/emr"}).json()
    assert [e["kind"] for e in ev] == ["backup_late"], ev
    while env.api.get("/v1/vms/emr").json()["job"]:  # that late backup ends
        time.sleep(0.05)
    # A slot the VM cannot be backed up at (it crashed) is missed: an error event, never silence.
    env.driver.crash("emr")
    assert env.api.get("/v1/vms/emr").json()["state"] == "crashed"
    now[0] += 86400
    portal.call(backups.tick)
    ev = env.api.get("/v1/events", params={"subject": "vm/emr"}).json()
    assert [(e["kind"], e["severity"]) for e in ev] == [("backup_late", "warning"), ("backup_missed", "error")]
    assert "crashed" in ev[-1]["message"]
    portal.call(backups.tick)  # reported once per slot
    assert len(env.api.get("/v1/events", params={"subject": "vm/emr"}).json()) == 2
