"""Migration's last step and host maintenance under trouble, with fake hosts: the operator hears of an old
copy that could not be ended, and a maintenance retries moves that failed before it reports what is left."""

from __future__ import annotations

from typing import Any

import pytest

from kasou.errors import HypervisorError, OperationTimeout
from tests.functional.conftest import Cluster


def _vm(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(cluster.api.get(f"/v1/vms/{name}").json())


def test_an_old_copy_that_cannot_be_ended_after_a_migration_is_an_operator_event(cluster: Cluster) -> None:
    """Before: a failed finish and stop of the paused source were only logged; the job said nothing."""
    v = cluster.create("emr", start=True)
    source = v["host"]
    target = ({"h1", "h2", "h3"} - {source}).pop()
    drv = cluster.drivers[source]

    async def refuse(name: str, *a: object, **kw: object) -> None:
        raise HypervisorError("QMP quit on VM 'emr' gave no answer in 10 s")

    drv.finish_out = refuse  # type: ignore[method-assign]
    drv.stop = refuse  # type: ignore[method-assign]
    job = cluster.wait(cluster.api.post("/v1/vms/emr/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "succeeded", job["error"]  # the VM runs on its new host
    v = _vm(cluster, "emr")
    assert v["host"] == target and v["state"] == "running"
    assert drv.vms["emr"].state.value == "paused"  # the old copy is still there, paused
    warnings = job["result"].get("warnings") or []
    assert len(warnings) == 1 and source in warnings[0] and "paused" in warnings[0], warnings
    events = cluster.api.get("/v1/events").json()
    left = [e for e in events if e["subject"] == "vm/emr" and e["kind"] == "migration_source_left"]
    assert left and left[0]["severity"] == "error" and source in left[0]["message"], events
    # Its disk file stays on the old host while that copy exists.
    assert any(p.exists() for p in (cluster.tmp / source / "disks" / "emr").glob("*.qcow2"))


def test_an_old_copy_ended_by_a_stop_after_a_failed_finish_is_no_warning(cluster: Cluster) -> None:
    v = cluster.create("emr", start=True)
    source = v["host"]
    target = ({"h1", "h2", "h3"} - {source}).pop()
    drv = cluster.drivers[source]

    async def refuse(name: str) -> None:
        raise HypervisorError("the finish failed")

    drv.finish_out = refuse  # type: ignore[method-assign]
    job = cluster.wait(cluster.api.post("/v1/vms/emr/migrate", json={"to": target}).json()["job"])
    assert job["state"] == "succeeded", job["error"]
    assert not job["result"].get("warnings")
    assert "emr" not in drv.vms


@pytest.fixture
def flaky_migrations(cluster: Cluster) -> dict[str, int]:
    """The first N migrations of a VM fail on its source (as a QMP time-out under load would); N per VM."""
    fails: dict[str, int] = {}
    for drv in cluster.drivers.values():
        real = drv.migrate_out

        async def migrate_out(name: str, *a: Any, _real: Any = real, **kw: Any) -> None:
            if fails.get(name, 0) > 0:
                fails[name] -= 1
                raise OperationTimeout(f"QMP object-add on VM {name!r} gave no answer in 10 s")
            await _real(name, *a, **kw)

        drv.migrate_out = migrate_out  # type: ignore[method-assign]
    return fails


def _three_vms(cluster: Cluster) -> str:
    """Three running VMs (one per host); returns the host of 'a'."""
    for n in ("a", "b", "c"):
        cluster.create(n, start=True)
    return cluster.host_of("a")


def _maintenance(cluster: Cluster, host: str) -> dict[str, Any]:
    r = cluster.api.post(f"/v1/hosts/{host}/maintenance", params={"on": True})
    assert r.status_code in (200, 202), r.text
    return cluster.wait(r.json()["job"])


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_MAINTENANCE_BACKOFF_S", "0.05")


def test_maintenance_retries_a_move_that_failed(
    cluster: Cluster, flaky_migrations: dict[str, int], quick_retries: None
) -> None:
    """Before: one failed migration and the maintenance gave up ('1 of 1 VMs could not leave ...')."""
    host = _three_vms(cluster)
    flaky_migrations["a"] = 2  # as under load: the first two moves time out in QMP
    job = _maintenance(cluster, host)
    assert job["state"] == "succeeded", job["error"]
    assert "a" in job["result"]["moved"] and job["result"]["retried"] == {"a": 3}
    assert cluster.host_of("a") != host and _vm(cluster, "a")["state"] == "running"
    assert flaky_migrations["a"] == 0


def test_maintenance_reports_what_is_left_after_its_attempts(
    cluster: Cluster, flaky_migrations: dict[str, int], quick_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _three_vms(cluster)
    flaky_migrations["a"] = 10
    job = _maintenance(cluster, host)
    assert job["state"] == "failed"
    msg = job["error"]["message"]
    assert msg.startswith(f"1 of 1 VMs could not leave {host} (e.g. a: migration of 'a' to "), msg
    assert "gave no answer in 10 s" in msg and "(tried 3 times)" in msg and "stays in maintenance" in msg, msg
    assert flaky_migrations["a"] == 7  # three attempts, no more
    v = _vm(cluster, "a")
    assert v["host"] == host and v["state"] == "running"  # it runs on where it was
    hosts = {h["name"]: h for h in cluster.api.get("/v1/hosts").json()}
    assert hosts[host]["maintenance"] is True


def test_maintenance_attempts_and_bound_are_settings(
    cluster: Cluster, flaky_migrations: dict[str, int], quick_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _three_vms(cluster)
    monkeypatch.setenv("KASOU_MAINTENANCE_RETRY_S", "0")  # no time for a second attempt
    flaky_migrations["a"] = 1
    job = _maintenance(cluster, host)
    assert job["state"] == "failed" and "tried" not in job["error"]["message"], job["error"]
    assert flaky_migrations["a"] == 0
    monkeypatch.setenv("KASOU_MAINTENANCE_RETRY_S", "600")
    monkeypatch.setenv("KASOU_MAINTENANCE_ATTEMPTS", "5")
    flaky_migrations["a"] = 4
    job = _maintenance(cluster, host)
    assert job["state"] == "succeeded", job["error"]
    assert job["result"]["retried"] == {"a": 5}
