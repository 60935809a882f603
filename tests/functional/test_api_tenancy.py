"""Department scope across a VM's life: what belongs to a VM (backups, console log, jobs, history) belongs to
its uuid and department, not to whoever holds its name now; and a vendor reaches nothing of another department
(networks, anti-affinity groups, HA priority, a VM's department, the names other departments use)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.functional.conftest import Env
from tests.functional.test_role_matrix import open_window

PW = "correct horse battery"
CSRF = {"x-kasou-csrf": "1"}
UNAVAILABLE = "the name 'lis' is not available; choose another name"


def vendor(env: Env, name: str, *departments: str) -> TestClient:
    """A browser signed in as a vendor of ``departments``, on the app's own event loop, inside an approved
    maintenance window (every permission) on a VM ``<first department>-base``: they may create VMs; acting on a
    VM takes a window that names it (:func:`inside`)."""
    body = {"name": name, "role": "vendor", "password": PW, "departments": list(departments)}
    assert env.api.post("/v1/users", json=body).status_code == 201
    c = env.client(base_url="http://testserver")
    c.portal = env.api.portal
    assert c.post("/v1/auth/login", json={"name": name, "password": PW}).status_code == 200
    env.create(f"{departments[0]}-base", department=departments[0])
    open_window(env, c, name, [f"{departments[0]}-base"])
    return c


def inside(env: Env, c: TestClient, *vms: str) -> None:
    """Vendor ``c`` gets an approved window on ``vms`` too."""
    open_window(env, c, c.get("/v1/auth/me").json()["name"], list(vms))


def backup(env: Env, vm: str) -> dict[str, Any]:
    r = env.api.post(f"/v1/vms/{vm}/backups", json={})
    assert r.status_code == 202, r.text
    return env.wait(r.json()["job"])


def delete(env: Env, vm: str) -> None:
    r = env.api.delete(f"/v1/vms/{vm}", params={"force": True})
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"


def test_a_vendor_cannot_take_a_deleted_vms_backups_by_reusing_its_name(env: Env) -> None:
    old = env.create("lis", department="lab")
    assert backup(env, "lis")["state"] == "succeeded"
    delete(env, "lis")
    pharmacy = vendor(env, "pv", "pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "lis", "image": "tiny"}, headers=CSRF)
    assert (r.status_code, r.json().get("message")) == (409, UNAVAILABLE), r.text
    assert env.api.get("/v1/vms/lis").status_code == 404  # nothing made
    # An administrator is refused too (another department), and told why.
    r = env.api.post("/v1/vms", json={"name": "lis", "image": "tiny", "department": "pharmacy"})
    assert r.status_code == 409 and "backups of an earlier VM of department 'lab'" in r.json()["message"], r.text
    # Restoring as that name for another department is refused the same way.
    other = env.create("ris", department="pharmacy")
    assert backup(env, "ris")["state"] == "succeeded"
    inside(env, pharmacy, "ris")
    r = pharmacy.post("/v1/vms/ris/backups/1/restore", json={"as": "lis"}, headers=CSRF)
    assert (r.status_code, r.json()["message"]) == (409, UNAVAILABLE), r.text
    del other
    # The lab's generation stays the lab's: an administrator restores it, the copy is the lab's.
    gens = env.api.get("/v1/vms/lis/backups").json()
    assert [(g["generation"], g["vm_uuid"], g["department"]) for g in gens] == [(1, old["uuid"], "lab")]
    r = env.api.post("/v1/vms/lis/backups/1/restore", json={"as": "lis-copy"})
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded", r.text
    assert env.api.get("/v1/vms/lis-copy").json()["department"] == "lab"


def test_a_reused_name_does_not_reach_the_old_vms_backups_log_jobs_or_history(env: Env) -> None:
    old = env.create("lis", department="lab")
    assert env.act("lis", "start")["state"] == "succeeded"
    assert "fake console of lis" in env.api.get("/v1/vms/lis/console").text
    assert backup(env, "lis")["state"] == "succeeded"
    old_jobs = {j["id"] for j in env.api.get("/v1/jobs", params={"vm": "lis"}).json()}
    delete(env, "lis")
    # The same department makes a new lis: it is another VM, with nothing of the old one.
    lab = vendor(env, "lv", "lab")
    r = lab.post("/v1/vms", json={"name": "lis", "image": "tiny"}, headers=CSRF)
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    inside(env, lab, "lis")  # the new lis (a window binds the VM's uuid)
    assert lab.get("/v1/vms/lis/backups").json() == []
    r = lab.post("/v1/vms/lis/backups/1/restore", json={"as": "stolen"}, headers=CSRF)
    assert r.status_code == 404 and "no backup generation 1" in r.json()["message"], r.text
    assert lab.get("/v1/vms/stolen").status_code == 404
    r = lab.get("/v1/vms/lis/console")
    assert r.status_code == 404 and "fake console" not in r.text, r.text
    new = lab.get("/v1/vms/lis").json()
    assert new["uuid"] != old["uuid"]
    hist = lab.get("/v1/vms/lis/history").json()
    assert [h["event"] for h in hist] == ["defined"] and all(h["uuid"] == new["uuid"] for h in hist)
    # The old VM's jobs were the lab's, but no window of the vendor names that VM: they do not see them.
    assert not old_jobs & {j["id"] for j in lab.get("/v1/jobs").json()}
    # An administrator reaches the deleted VM's generations by its uuid.
    gens = env.api.get("/v1/vms/lis/backups", params={"uuid": old["uuid"]}).json()
    assert [g["generation"] for g in gens] == [1]
    r = lab.get("/v1/vms/lis/backups", params={"uuid": old["uuid"]})
    assert r.status_code == 403, r.text
    r = env.api.post("/v1/vms/lis/backups/1/restore", json={"as": "old-lis", "uuid": old["uuid"]})
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded", r.text


def test_another_departments_vm_of_a_reused_name_sees_no_old_log_jobs_or_history(env: Env) -> None:
    env.create("lis", department="lab")
    assert env.api.patch("/v1/vms/lis/backup-policy", json={"daily": "02:30", "keep": 3}).status_code == 200
    assert env.act("lis", "start")["state"] == "succeeded"
    old_jobs = [j["id"] for j in env.api.get("/v1/jobs", params={"vm": "lis"}).json()]
    delete(env, "lis")  # never backed up: the name is free again
    pharmacy = vendor(env, "pv", "pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "lis", "image": "tiny"}, headers=CSRF)
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"
    inside(env, pharmacy, "lis")
    r = pharmacy.get("/v1/vms/lis/console")
    assert r.status_code == 404 and "fake console" not in r.text, r.text
    for job in old_jobs:
        r = pharmacy.get(f"/v1/jobs/{job}")
        assert r.status_code == 404, (job, r.text)
        assert pharmacy.post(f"/v1/jobs/{job}/cancel", headers=CSRF).status_code == 404
    assert not set(old_jobs) & {j["id"] for j in pharmacy.get("/v1/jobs").json()}
    assert not set(old_jobs) & {j["id"] for j in pharmacy.get("/v1/jobs", params={"vm": "lis"}).json()}
    assert [h["event"] for h in pharmacy.get("/v1/vms/lis/history").json()] == ["defined"]
    policy = pharmacy.get("/v1/vms/lis/backup-policy").json()  # the lab's schedule is not the new VM's
    assert (policy["daily"], policy["keep_is_default"]) == (None, True), policy
    # Once started, the log is the new VM's own.
    r = pharmacy.post("/v1/vms/lis/actions/start", headers=CSRF)
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"
    assert "fake console of lis" in pharmacy.get("/v1/vms/lis/console").text


# -- item 7: a vendor's reach ---------------------------------------------------------------------------------


def test_the_unknown_network_error_lists_only_networks_the_caller_may_use(env: Env) -> None:
    assert env.api.post("/v1/networks", json={"name": "labnet", "vlan": 10, "departments": ["lab"]}).status_code == 201
    assert (
        env.api.post("/v1/networks", json={"name": "rxnet", "vlan": 20, "departments": ["pharmacy"]}).status_code == 201
    )
    assert env.api.post("/v1/networks", json={"name": "common", "vlan": 30}).status_code == 201
    pharmacy = vendor(env, "pv", "pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "network": "nosuch"}, headers=CSRF)
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert "rxnet" in msg and "common" in msg and "labnet" not in msg, msg
    # Another department's network is unknown to them (the same answer as a network that does not exist).
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "network": "labnet"}, headers=CSRF)
    assert r.status_code == 422 and r.json()["message"].startswith("unknown network 'labnet' ("), r.text
    assert "lab" not in r.json()["message"].split("(", 1)[1]
    assert env.api.get("/v1/vms/x").status_code == 404
    # Their own and the unrestricted network are fine; an administrator sees the list on the network.
    for net in ("rxnet", "common"):
        r = pharmacy.post("/v1/vms", json={"name": f"on-{net}", "image": "tiny", "network": net}, headers=CSRF)
        assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded", r.text
    assert env.api.get("/v1/networks/labnet").json()["departments"] == ["lab"]
    # An administrator's VM of another department is refused on it too, with the reason.
    r = env.api.post("/v1/vms", json={"name": "y", "image": "tiny", "network": "labnet", "department": "pharmacy"})
    assert r.status_code == 422 and "for departments lab only" in r.json()["message"], r.text
    # ...and an administrator changes who may use it.
    r = env.api.patch("/v1/networks/labnet", json={"departments": ["lab", "pharmacy"]})
    assert r.status_code == 200 and r.json()["departments"] == ["lab", "pharmacy"], r.text
    r = pharmacy.post("/v1/vms", json={"name": "z", "image": "tiny", "network": "labnet"}, headers=CSRF)
    assert r.status_code == 202, r.text
    assert env.wait(r.json()["job"])["state"] == "succeeded"


def test_a_vendor_cannot_join_another_departments_anti_affinity_group(env: Env) -> None:
    env.create("db1", department="lab", anti_affinity="lab-db")
    pharmacy = vendor(env, "pv", "pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "anti_affinity": "lab-db"}, headers=CSRF)
    assert r.status_code == 409, r.text
    assert r.json()["message"] == "anti-affinity group 'lab-db' is not available; choose another group name"
    assert env.api.get("/v1/vms/x").status_code == 404
    # Their own group is fine, and the lab may join its own.
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "anti_affinity": "rx-db"}, headers=CSRF)
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"
    lab = vendor(env, "lv", "lab")
    r = lab.post("/v1/vms", json={"name": "db2", "image": "tiny", "anti_affinity": "lab-db"}, headers=CSRF)
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"


def test_a_vendors_ha_priority_has_a_ceiling(env: Env) -> None:
    pharmacy = vendor(env, "pv", "pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "ha": True, "priority": 100}, headers=CSRF)
    assert r.status_code == 403 and "HA priority up to 50" in r.json()["message"], r.text
    assert env.api.get("/v1/vms/x").status_code == 404
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "priority": 50}, headers=CSRF)
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"
    inside(env, pharmacy, "x")
    r = pharmacy.patch("/v1/vms/x", json={"priority": 90}, headers=CSRF)
    assert r.status_code == 403 and "HA priority up to 50" in r.json()["message"], r.text
    assert env.api.get("/v1/vms/x").json()["priority"] == 50
    assert pharmacy.patch("/v1/vms/x", json={"priority": 10}, headers=CSRF).status_code == 200
    assert env.api.patch("/v1/vms/x", json={"priority": 90}).status_code == 200  # an administrator may


def test_a_vendors_ha_priority_ceiling_is_a_setting(env: Env, monkeypatch: Any) -> None:
    monkeypatch.setenv("KASOU_VENDOR_MAX_PRIORITY", "30")
    pharmacy = vendor(env, "pv", "pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny", "priority": 40}, headers=CSRF)
    assert r.status_code == 403 and "HA priority up to 30" in r.json()["message"], r.text
    r = pharmacy.post("/v1/vms", json={"name": "x", "image": "tiny"}, headers=CSRF)  # the default fits under it
    assert r.status_code == 202 and env.wait(r.json()["job"])["state"] == "succeeded"
    assert env.api.get("/v1/vms/x").json()["priority"] == 30


def test_a_vendor_cannot_hand_a_vm_to_another_department(env: Env) -> None:
    env.create("lis", department="lab")
    lab = vendor(env, "lv", "lab", "micro")
    inside(env, lab, "lis")
    for dep in ("pharmacy", "micro", ""):
        r = lab.patch("/v1/vms/lis", json={"department": dep}, headers=CSRF)
        assert r.status_code == 403 and "department" in r.json()["message"], (dep, r.text)
    assert env.api.get("/v1/vms/lis").json()["department"] == "lab"
    assert lab.patch("/v1/vms/lis", json={"department": "lab", "description": "x"}, headers=CSRF).status_code == 200


def test_a_name_another_department_uses_answers_as_if_unknown(env: Env) -> None:
    env.create("lis", department="lab")
    env.create("infra")  # no department
    pharmacy = vendor(env, "pv", "pharmacy")
    assert pharmacy.get("/v1/vms/lis").status_code == 404
    for name in ("lis", "infra"):
        r = pharmacy.post("/v1/vms", json={"name": name, "image": "tiny"}, headers=CSRF)
        assert (r.status_code, r.json()["message"]) == (409, UNAVAILABLE.replace("lis", name)), r.text
        assert r.json()["code"] == "conflict"  # not "already_exists"
    # Their own name is theirs to know.
    env.create("rx", department="pharmacy")
    r = pharmacy.post("/v1/vms", json={"name": "rx", "image": "tiny"}, headers=CSRF)
    assert r.status_code == 409 and r.json()["message"] == "a VM named 'rx' already exists"
    # An administrator is told plainly.
    r = env.api.post("/v1/vms", json={"name": "lis", "image": "tiny"})
    assert r.status_code == 409 and r.json()["message"] == "a VM named 'lis' already exists"


# -- the CLI --------------------------------------------------------------------------------------------------


def test_cli_network_departments_and_a_deleted_vms_backups(env: Env) -> None:
    import json

    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common
    from kasou.cli import main as cli
    from tests.functional.conftest import TOKEN

    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:

        def run(*args: str) -> Any:
            return runner.invoke(cli.app, list(args), catch_exceptions=True)

        r = run("network", "create", "labnet", "--vlan", "10", "--department", "lab")
        assert r.exit_code == 0 and r.output.strip() == "network labnet: created (VLAN 10; for departments lab only)"
        r = run("network", "set", "labnet", "--department", "lab", "--department", "micro")
        assert r.exit_code == 0 and r.output.strip() == "network labnet: for departments lab, micro only", r.output
        assert "lab, micro" in run("network", "list").output
        assert run("network", "set", "labnet").exit_code != 0  # neither option: nothing changed
        r = run("network", "set", "labnet", "--all-departments")
        assert r.exit_code == 0 and r.output.strip() == "network labnet: for every department"
        old = env.create("lis", department="lab")
        assert old["uuid"] in run("vm", "show", "lis").output
        assert backup(env, "lis")["state"] == "succeeded"
        delete(env, "lis")
        env.create("lis", department="lab")
        assert json.loads(run("backup", "list", "lis", "--json").output) == []
        gens = json.loads(run("backup", "list", "lis", "--uuid", old["uuid"], "--json").output)
        assert [(g["generation"], g["vm_uuid"]) for g in gens] == [(1, old["uuid"])]
        r = run("backup", "restore", "lis", "1", "--as", "lis-old", "--uuid", old["uuid"])
        assert r.exit_code == 0 and "restored from generation 1 of lis" in r.output, r.output
    finally:
        common.client_factory = None
