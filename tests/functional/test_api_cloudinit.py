"""cloud-init seeds through the API: recorded with the VM, given to its host at each start, kept (but for the
name and address) by the linked clones of a template, refused when wrong with nothing made."""

from __future__ import annotations

from tests.functional.conftest import Env

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0cLnH5xpKh0V2mZ7+Jfj2n3l3k4Z7J2Uq0o6Tz0K9r it@hospital"


def test_a_vm_starts_with_its_seed_and_shows_it(env: Env) -> None:
    ci = {"hostname": "emr-db1", "ssh_keys": [KEY], "ip": "10.20.0.15/24", "gateway": "10.20.0.1",
          "user_data": "#cloud-config\nruncmd: [true]\n"}  # fmt: skip
    vm = env.create("emr", start=True, cloud_init=ci)
    assert vm["cloud_init"] == {"hostname": "emr-db1", "ip": "10.20.0.15/24", "gateway": "10.20.0.1", "dns": [],
                                "ssh_keys": ["ssh-ed25519 it@hospital"], "user_data": True}  # fmt: skip
    spec = env.driver.specs["emr"]
    assert spec.cloud_init is not None and spec.cloud_init.user_data == ci["user_data"]
    assert spec.cloud_init.ip == "10.20.0.15/24"


def test_linked_clones_keep_the_keys_and_get_their_own_name_and_address(env: Env) -> None:
    env.create("tpl", cloud_init={"hostname": "tpl", "ssh_keys": [KEY], "ip": "10.20.0.9/24"})
    assert env.api.post("/v1/vms/tpl/template").status_code == 200
    env.create("c1", template="tpl", image=None, start=True)
    ci = env.driver.specs["c1"].cloud_init
    assert ci is not None and ci.ssh_keys == [KEY] and ci.hostname is None and ci.ip is None  # its own name: c1
    env.create("c2", template="tpl", image=None, start=True, cloud_init={"ip": "10.20.0.12/24"})
    ci = env.driver.specs["c2"].cloud_init
    assert ci is not None and ci.ip == "10.20.0.12/24" and ci.ssh_keys == [KEY]  # the template's keys stay


def test_a_bad_seed_changes_nothing(env: Env) -> None:
    r = env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "cloud_init": {"ip": "10.0.0.5"}})
    assert r.status_code == 422 and "needs its prefix length" in r.json()["message"], r.text
    r = env.api.post("/v1/vms", json={"name": "x", "image": "tiny", "cloud_init": {"password": "secret"}})
    assert r.status_code == 422, r.text
    assert env.api.get("/v1/vms").json() == [] and env.disk_files() == []
