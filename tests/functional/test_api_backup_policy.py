"""Backup policy in a hospital's words through the API (fake driver, real qcow2 files): criticality
defaults, a department's schedule and retention followed by its VMs, the weekly full, bad input."""

from __future__ import annotations

import time
from datetime import datetime

from kasou.control.backup_policy import WEEKDAYS
from kasou.model.timeofday import last_slot
from tests.functional.conftest import Env


def _wait_scheduled(env: Env, vm: str) -> list[dict]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        gens = env.api.get(f"/v1/vms/{vm}/backups").json()
        if any(g["scheduled"] for g in gens) and not env.api.get(f"/v1/vms/{vm}").json()["job"]:
            return list(gens)
        time.sleep(0.05)
    raise AssertionError(f"{vm}: no scheduled generation")


def test_criticality_sets_the_default_and_a_department_policy_is_followed(env: Env) -> None:
    env.create("emr", criticality="24h-clinical", department="emr", start=True)
    env.create("lis", department="lab", criticality="business", start=True)
    assert env.api.get("/v1/vms/lis").json()["criticality"] == "business-hours"  # an alias, stored by its name
    p = env.api.get("/v1/vms/emr/backup-policy").json()
    assert (p["keep"], p["keep_is_default"], p["daily"]) == (5, True, None), p
    assert p["sources"]["retention"] == "default for criticality 24h-clinical"
    assert env.api.get("/v1/vms/lis/backup-policy").json()["keep"] == 3

    backups = env.services.vms.backups
    portal = env.api.portal  # type: ignore[attr-defined]
    now = [time.time()]
    backups.clock = lambda: now[0]
    due = time.strftime("%H:%M", time.localtime(now[0] + 120))
    slot = last_slot(due, now[0] + 180)
    today = WEEKDAYS[datetime.fromtimestamp(slot).weekday()]
    body = {"daily": due, "weekly": today[:3], "keep_daily": 2, "lock_days": 30}
    r = env.api.patch("/v1/departments/lab/backup-policy", json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["weekly"], r.json()["keep"], r.json()["keep_daily"]) == (today, 0, 2)
    p = env.api.get("/v1/vms/lis/backup-policy").json()
    assert (p["daily"], p["lock_days"], p["keep_daily"]) == (due, 30, 2), p
    assert p["sources"] == {"schedule": "department lab", "retention": "department lab", "lock": "department lab"}

    backups_before = env.api.post("/v1/vms/lis/backups", json={})  # a first generation, by hand
    env.wait(backups_before.json()["job"])
    now[0] = slot + 5
    portal.call(backups.tick)
    gens = _wait_scheduled(env, "lis")
    # keep-daily 2: of the two generations of one day only the newest is kept; the weekly day's is a full one
    assert [(g["generation"], g["kind"]) for g in gens] == [(2, "full")], gens
    assert env.api.get("/v1/vms/emr/backups").json() == []  # emr's department has no schedule
    portal.call(backups.tick)  # the same slot never runs twice
    time.sleep(0.2)
    assert len(env.api.get("/v1/vms/lis/backups").json()) == 1

    # The VM's own settings win: no schedule for it, whatever its department says.
    r = env.api.patch("/v1/vms/lis/backup-policy", json={"off": True, "keep": 4})
    assert r.status_code == 200 and r.json()["daily"] is None and r.json()["sources"]["schedule"] == "vm (off)"
    now[0] += 86400
    portal.call(backups.tick)
    time.sleep(0.2)
    assert len(env.api.get("/v1/vms/lis/backups").json()) == 1
    listing = env.api.get("/v1/backup-policies").json()
    assert [d["department"] for d in listing["departments"]] == ["lab"]
    assert {v["vm"]: v["keep"] for v in listing["vms"]} == {"emr": 5, "lis": 4}


def test_bad_policies_change_nothing(env: Env) -> None:
    env.create("emr", department="emr")
    for path, body, text in (
        ("/v1/departments/emr/backup-policy", {"weekly": "funday"}, "day of the week"),
        ("/v1/departments/emr/backup-policy", {"keep_daily": 2000}, "0 to 1000"),
        ("/v1/departments/bad%20name/backup-policy", {"keep": 2}, "department"),
        ("/v1/vms/emr/backup-policy", {"lock_days": -1}, "lock-days"),
        ("/v1/vms/emr/backup-policy", {"daily": "7pm"}, "HH:MM"),
    ):
        r = env.api.patch(path, json=body)
        assert r.status_code == 422 and text in r.json()["message"], (path, r.text)
    assert env.api.get("/v1/departments/emr/backup-policy").status_code == 404
    assert env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "criticality": "urgent"}).status_code == 422
