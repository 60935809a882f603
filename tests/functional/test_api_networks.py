"""VM networks through the REST API and the CLI, with the fake driver (one host, and two for migration)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli import main as cli
from kasou.control.networks import network_key
from tests.cli_errors import error_of as cli_error_of
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import TOKEN, Env, make_cluster


def make(env: Env, name: str, vlan: int | None = None, description: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "description": description}
    if vlan is not None:
        body["vlan"] = vlan
    r = env.api.post("/v1/networks", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def names(env: Env) -> list[str]:
    return [n["name"] for n in env.api.get("/v1/networks").json()]


def test_create_list_get_delete(env: Env) -> None:
    n = make(env, "clinical", 10, "wards, EMR, pharmacy")
    assert (n["name"], n["vlan"], n["description"], n["vms"]) == ("clinical", 10, "wards, EMR, pharmacy", [])
    make(env, "imaging", 20)
    make(env, "mgmt")
    listed = env.api.get("/v1/networks").json()
    assert [(x["name"], x["vlan"]) for x in listed] == [("clinical", 10), ("imaging", 20), ("mgmt", None)]
    assert env.api.get("/v1/networks/imaging").json()["vlan"] == 20
    r = env.api.delete("/v1/networks/imaging")
    assert r.status_code == 200 and r.json()["name"] == "imaging"
    assert names(env) == ["clinical", "mgmt"]
    assert env.api.get("/v1/networks/imaging").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"name": "a/b", "vlan": 10}, 422, "may contain only"),
        ({"name": "..", "vlan": 10}, 422, "'..'"),
        ({"name": "", "vlan": 10}, 422, "must not be empty"),
        ({"name": "x y"}, 422, "may contain only"),
        ({"name": "a" * 64}, 422, "at most 63"),
        ({"name": "user"}, 422, "built-in NAT"),
        ({"name": "v", "vlan": 0}, 422, "vlan must be between 1 and 4094, not 0"),
        ({"name": "v", "vlan": 5000}, 422, "vlan must be between 1 and 4094, not 5000"),
        ({"name": "v", "vlan": "10"}, 422, "vlan"),
        ({"name": "v", "vlan": True}, 422, "vlan"),
        ({"name": "v", "bridge": "br0"}, 422, "bridge"),
        ({"name": "v", "description": "x" * 501}, 422, "description"),
        ({"name": "clinical"}, 409, "already exists"),
        ({"name": "other", "vlan": 10}, 409, "VLAN 10 already carries network 'clinical'"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(env: Env, body: dict, status: int, words: str) -> None:
    make(env, "clinical", 10)
    before = env.api.get("/v1/networks").json()
    r = env.api.post("/v1/networks", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["message"]
    assert "\n" not in r.json()["message"]
    assert env.api.get("/v1/networks").json() == before


def test_unknown_names_and_the_builtin(env: Env) -> None:
    assert env.api.get("/v1/networks/nosuch").status_code == 404
    r = env.api.delete("/v1/networks/nosuch")
    assert r.status_code == 404 and r.json()["message"] == "no network named 'nosuch'"
    r = env.api.delete("/v1/networks/user")
    assert r.status_code == 422 and "built-in" in r.json()["message"]
    assert env.api.delete("/v1/networks/a..b").status_code == 422


def test_vm_on_a_network_records_network_vlan_and_mac(env: Env) -> None:
    make(env, "clinical", 10)
    vm = env.create("emr1", network="clinical", start=True)
    assert len(vm["nics"]) == 1
    nic = vm["nics"][0]
    assert (nic["id"], nic["network"], nic["vlan"]) == ("net0", "clinical", 10)
    launched = env.driver.specs["emr1"].nics
    assert [(n.network, n.vlan, n.mac) for n in launched] == [("clinical", 10, nic["mac"])]
    assert env.api.get("/v1/networks/clinical").json()["vms"] == ["emr1"]
    assert "network clinical (VLAN 10)" in env.api.get("/v1/vms/emr1/history").json()[0]["detail"]


def test_the_default_is_user(env: Env) -> None:
    nic = env.create("lab1")["nics"][0]
    assert (nic["network"], nic["vlan"]) == ("user", None)


def test_unknown_network_is_422_and_changes_nothing(env: Env) -> None:
    make(env, "clinical", 10)
    r = env.api.post("/v1/vms", json={"name": "ris1", "image": "tiny", "network": "imaging", "start": True})
    assert r.status_code == 422
    msg = r.json()["message"]
    assert msg.startswith("unknown network 'imaging'") and "clinical" in msg and "\n" not in msg
    assert r.json()["details"]["field"] == "network"
    assert env.api.get("/v1/vms").json() == []
    assert env.disk_files() == []
    assert env.driver.vms == {}
    assert env.api.get("/v1/vms/ris1/history").status_code == 404


def test_a_network_in_use_cannot_be_deleted(env: Env) -> None:
    make(env, "imaging", 20)
    env.create("pacs1", network="imaging")
    env.create("pacs2", network="imaging")
    r = env.api.delete("/v1/networks/imaging")
    assert r.status_code == 409
    assert r.json()["message"] == "network 'imaging' is in use by VMs pacs1, pacs2; delete them first"
    assert names(env) == ["imaging"]
    for vm in ("pacs1", "pacs2"):
        assert env.wait(env.api.delete(f"/v1/vms/{vm}").json()["job"])["state"] == "succeeded"
    assert env.api.delete("/v1/networks/imaging").status_code == 200
    assert names(env) == []


def test_a_network_being_deleted_takes_no_new_vm(env: Env) -> None:
    make(env, "mgmt")
    store = env.services.store
    rec = env.api.get("/v1/networks/mgmt").json()
    mark = {"name": "mgmt", "vlan": None, "description": "", "created_at": rec["created_at"], "deleting": True}
    asyncio.run(_put(store, network_key("mgmt"), mark))
    r = env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "network": "mgmt"})
    assert r.status_code == 422 and "unknown network 'mgmt'" in r.json()["message"]
    assert env.api.get("/v1/vms").json() == []
    # A delete interrupted after marking is finished by the next one.
    assert env.api.delete("/v1/networks/mgmt").status_code == 200
    assert names(env) == []


def test_a_delete_refused_for_a_vm_leaves_the_network_usable(env: Env) -> None:
    make(env, "mgmt")
    env.create("a", network="mgmt")
    assert env.api.delete("/v1/networks/mgmt").status_code == 409
    env.create("b", network="mgmt")  # the delete's mark was taken back
    assert env.api.get("/v1/networks/mgmt").json()["vms"] == ["a", "b"]


async def _put(store: Any, key: str, value: dict[str, Any]) -> None:
    await store.put(key, value)


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def run(env: Env) -> Iterator[Any]:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(cli.app, list(args), catch_exceptions=True)

    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        yield invoke
    finally:
        common.client_factory = None


def error_of(result: Any) -> str:
    """What ``kasou`` prints after ``error:`` (one line on stderr, and its exit code)."""
    return cli_error_of(result)


def test_cli_create_list_delete(env: Env, run: Any) -> None:
    r = run("network", "create", "clinical", "--vlan", "10", "--description", "wards")
    assert r.exit_code == 0 and r.output.strip() == "network clinical: created (VLAN 10)"
    assert run("network", "create", "mgmt").output.strip() == "network mgmt: created (untagged)"
    listed = json.loads(run("network", "list", "--json").output)
    assert [(n["name"], n["vlan"], n["description"]) for n in listed] == [("clinical", 10, "wards"), ("mgmt", None, "")]
    table = run("network", "list").output
    assert "clinical" in table and "10" in table and "mgmt" in table
    assert run("network", "delete", "mgmt").output.strip() == "network mgmt: deleted"
    assert names(env) == ["clinical"]


def test_cli_vm_create_on_a_network_and_show(env: Env, run: Any) -> None:
    run("network", "create", "imaging", "--vlan", "20")
    r = run("vm", "create", "pacs1", "--image", "tiny", "--network", "imaging")
    assert r.exit_code == 0, r.output
    shown = run("vm", "show", "pacs1").output
    assert "on imaging (VLAN 20)" in shown
    assert run("vm", "create", "x1", "--image", "tiny").exit_code == 0
    assert "on user" in run("vm", "show", "x1").output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("network", "create", "a/b"), "may contain only"),
        (("network", "create", "v", "--vlan", "0"), "vlan must be between 1 and 4094, not 0"),
        (("network", "create", "v", "--vlan", "5000"), "vlan must be between 1 and 4094, not 5000"),
        (("network", "create", "v", "--vlan", "ten"), "vlan must be a whole number, not 'ten'"),
        (("network", "create", "clinical"), "a network named 'clinical' already exists"),
        (("network", "delete", "a/b"), "network 'a/b' may contain only"),
        (("network", "delete", "nosuch"), "no network named 'nosuch'"),
        (("vm", "create", "r1", "--image", "tiny", "--network", "nosuch"), "unknown network 'nosuch'"),
    ],
)
def test_cli_errors_are_one_line_and_change_nothing(env: Env, run: Any, args: tuple[str, ...], words: str) -> None:
    run("network", "create", "clinical", "--vlan", "10")
    before = env.api.get("/v1/networks").json()
    assert words in error_of(run(*args))
    assert env.api.get("/v1/networks").json() == before
    assert env.api.get("/v1/vms").json() == []


# -- migration keeps the NIC ---------------------------------------------------------------------


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, FakeDriver]]]:
    for c in make_cluster(tmp_path, ["h1", "h2"]):
        yield c.api, c.drivers


def _wait(api: TestClient, job: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        j = api.get(f"/v1/jobs/{job['id']}").json()
        if j["state"] in ("succeeded", "failed"):
            return dict(j)
        time.sleep(0.01)
    raise AssertionError("job did not finish")


def test_migration_keeps_network_vlan_and_mac(two_hosts: tuple[TestClient, dict[str, FakeDriver]]) -> None:
    api, drivers = two_hosts
    assert api.post("/v1/networks", json={"name": "clinical", "vlan": 10}).status_code == 201
    body = {"name": "b", "image": "tiny", "network": "clinical", "storage": "shared", "start": True}
    r = api.post("/v1/vms", json=body)
    assert _wait(api, r.json()["job"])["state"] == "succeeded"
    before = api.get("/v1/vms/b").json()
    target = "h2" if before["host"] == "h1" else "h1"
    r = api.post("/v1/vms/b/migrate", json={"to": target})
    assert _wait(api, r.json()["job"])["state"] == "succeeded"
    after = api.get("/v1/vms/b").json()
    assert after["host"] == target
    assert after["nics"] == before["nics"]
    arrived = drivers[target].specs["b"].nics
    assert [(n.network, n.vlan, n.mac) for n in arrived] == [("clinical", 10, before["nics"][0]["mac"])]
    assert "b" not in drivers[before["host"]].vms  # the source copy is gone
