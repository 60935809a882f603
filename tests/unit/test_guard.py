"""The host guard: renewal, self-fencing of HA VMs only, quorum loss, rejoining after an expired lease."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kasou.agent import guard as guard_mod
from kasou.agent.guard import HostGuard
from kasou.config import HaTimes, Paths
from kasou.errors import StoreError
from kasou.hypervisor.qemu import process


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Store:
    endpoints = ["http://e1", "http://e2", "http://e3"]
    tls = None

    def __init__(self) -> None:
        self.fail: str | None = None  # "network" or "expired"
        self.leases = 0
        self.kv: dict[str, Any] = {}

    async def grant_lease(self, ttl: float) -> int:
        if self.fail == "network":
            raise StoreError("no etcd endpoint answered")
        self.leases += 1
        return self.leases

    async def put(self, key: str, value: dict[str, Any], lease: int | None = None) -> int:
        if self.fail == "network":
            raise StoreError("no etcd endpoint answered")
        self.kv[key] = (value, lease)
        return 1

    async def keepalive(self, lease: int) -> float:
        if self.fail == "network":
            raise StoreError("no etcd endpoint answered")
        if self.fail == "expired":  # etcd deletes a lease's keys as it revokes it
            self.kv = {k: v for k, v in self.kv.items() if v[1] != lease}
            raise StoreError("expired", lease=lease)
        if self.fail == "lagging":  # a member behind the others says "expired"; the keys are there
            raise StoreError("expired", lease=lease)
        return 6.0

    async def get(self, key: str) -> Any:
        if self.fail == "network":
            raise StoreError("no etcd endpoint answered")
        found = self.kv.get(key)
        return None if found is None else SimpleNamespace(key=key, value=found[0], mod_rev=1)


def _vm(paths: Paths, name: str, ha: bool) -> subprocess.Popen[bytes]:
    d = paths.vm_run / name
    d.mkdir(parents=True)
    (d / "launch.json").write_text(json.dumps({"spec": {"name": name, "ha": ha}}))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"guest={name}"])
    (d / "qemu.pid").write_text(str(proc.pid))
    return proc


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[HostGuard, Store, Clock, dict[str, subprocess.Popen[bytes]]]]:
    paths = Paths(home=tmp_path / "home", images=tmp_path / "images")
    shutil.rmtree(paths.vm_run, ignore_errors=True)  # VM runtime files left by an earlier run of this home
    paths.ensure()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    store, clock = Store(), Clock()
    g = HostGuard(store, "h1", paths, HaTimes(6, 2), lambda: {"agent_url": "http://x"}, clock=clock)  # type: ignore[arg-type]
    yield g, store, clock, procs
    for p in procs.values():
        p.kill()
        p.wait()
    shutil.rmtree(paths.vm_run, ignore_errors=True)


async def join(g: HostGuard, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """The host joins the cluster, then runs an HA VM (emr) and one without HA (diet)."""
    await g.renew_once()
    procs["emr"] = _vm(g.paths, "emr", True)
    procs["diet"] = _vm(g.paths, "diet", False)


def _alive(p: subprocess.Popen[bytes]) -> bool:
    p.poll()
    return process.alive(p.pid)


async def test_renewed_lease_fences_nothing(setup: Any) -> None:
    g, store, clock, procs = setup
    await join(g, procs)
    assert store.kv["hosts/h1"][1] == 1
    for _ in range(10):
        clock.t += 1
        await g.renew_once()
        assert g.check() == []
    assert _alive(procs["emr"]) and _alive(procs["diet"])


async def test_no_renewal_for_ttl_minus_margin_kills_only_ha_vms(setup: Any, monkeypatch: Any) -> None:
    g, store, clock, procs = setup

    async def reachable(endpoint: str, metrics: str | None = None, tls: Any = None) -> str:
        return "unknown"  # a member that may well have a leader: this host is cut off

    monkeypatch.setattr(guard_mod, "probe_member", reachable)
    await join(g, procs)
    store.fail = "network"
    clock.t += 3.9
    await g.renew_once()
    assert g.check() == []  # 3.9 s < 6 - 2
    clock.t += 0.2
    assert g.check() == ["emr"]
    assert not _alive(procs["emr"]) and _alive(procs["diet"])
    assert "could not renew" in json.loads((g.paths.vm_run / "emr" / "fenced.json").read_text())["reason"]


async def test_quorum_lost_everywhere_holds_the_fence(setup: Any, monkeypatch: Any) -> None:
    g, store, clock, procs = setup
    answers = iter(["no-leader", "dead", "dead"] * 10)

    async def no_quorum(endpoint: str, metrics: str | None = None, tls: Any = None) -> str:
        return next(answers)

    monkeypatch.setattr(guard_mod, "probe_member", no_quorum)
    await join(g, procs)
    store.fail = "network"
    for _ in range(10):
        clock.t += 1
        await g.renew_once()
        assert g.check() == []
    assert _alive(procs["emr"])


async def test_one_unknown_member_with_two_dead_still_holds_but_two_unknown_fence(setup: Any, monkeypatch: Any) -> None:
    g, store, clock, procs = setup
    answers = iter(["unknown", "unknown", "no-leader"] * 10)

    async def cut_off(endpoint: str, metrics: str | None = None, tls: Any = None) -> str:
        return next(answers)

    monkeypatch.setattr(guard_mod, "probe_member", cut_off)
    await join(g, procs)
    store.fail = "network"
    clock.t += 5
    await g.renew_once()
    assert g.check() == ["emr"]


async def test_an_expired_lease_fences_before_rejoining(setup: Any) -> None:
    g, store, clock, procs = setup
    await join(g, procs)
    store.fail = "expired"
    clock.t += 1
    await g.renew_once()  # the lease is gone for good
    assert g.lease is None
    store.fail = None
    await g.renew_once()  # rejoin: kills first
    assert not _alive(procs["emr"]) and _alive(procs["diet"])
    assert g.lease == 2 and store.kv["hosts/h1"][1] == 2


async def test_a_lagging_member_saying_expired_fences_nothing(setup: Any) -> None:
    g, store, clock, procs = setup
    await join(g, procs)
    lease = g.lease
    store.fail = "lagging"
    clock.t += 1
    await g.renew_once()  # "expired", but the host's key is still attached to the lease: not believed
    assert g.lease == lease and g.check() == []
    store.fail = None
    clock.t += 1
    await g.renew_once()
    assert g.lease == lease and g.check() == [] and _alive(procs["emr"])


async def test_after_quorum_returns_the_guard_has_ttl_minus_margin_from_the_last_proof(
    setup: Any, monkeypatch: Any
) -> None:
    g, store, clock, procs = setup
    answers = ["no-leader", "dead", "dead"]

    async def probe(endpoint: str, metrics: str | None = None, tls: Any = None) -> str:
        return answers[Store.endpoints.index(endpoint)]

    monkeypatch.setattr(guard_mod, "probe_member", probe)
    await join(g, procs)
    store.fail = "network"
    clock.t += 20
    await g.renew_once()  # no quorum anywhere: proof at t
    proof = clock.t
    answers[:] = ["unknown", "unknown", "unknown"]  # members restarting: nothing is known
    clock.t = proof + 3.9
    await g.renew_once()
    assert g.check() == []
    clock.t = proof + 4.1
    assert g.check() == ["emr"]


def test_metrics_urls_follow_the_members(monkeypatch: Any) -> None:
    from kasou.config import etcd_metrics_endpoints

    monkeypatch.delenv("KASOU_ETCD_METRICS", raising=False)
    assert etcd_metrics_endpoints(3) == [None, None, None]
    monkeypatch.setenv("KASOU_ETCD_METRICS", "http://a:2381/, ,http://c:2381")
    assert etcd_metrics_endpoints(3) == ["http://a:2381", None, "http://c:2381"]
    monkeypatch.setenv("KASOU_ETCD_METRICS", "http://a:2381")
    assert etcd_metrics_endpoints(3) == ["http://a:2381", None, None]
    monkeypatch.setenv("KASOU_ETCD_METRICS", "http://a,http://b")
    with pytest.raises(ValueError, match="2 URLs for 1 etcd members"):
        etcd_metrics_endpoints(1)


def test_members_learnt_later_are_asked_on_kasous_metrics_port() -> None:
    from kasou.agent.guard import member_metrics

    first = {"https://10.0.0.11:2379": "https://10.0.0.11:2381"}  # the first host's settings: its own member
    learnt = ["https://10.0.0.11:2379", "https://10.0.0.12:2379", "https://[fd00::13]:2379"]
    assert member_metrics(learnt, first) == [
        "https://10.0.0.11:2381", "https://10.0.0.12:2381", "https://[fd00::13]:2381"]  # fmt: skip
    # Settings that follow another rule (a hand-made cluster, the lab's ports): a learnt member has none.
    own = {"https://10.0.0.11:2379": "https://10.0.0.11:9000"}
    assert member_metrics(learnt, own) == ["https://10.0.0.11:9000", None, None]
    # No metrics URL in the settings: none learnt either; a configured member without one keeps none.
    assert member_metrics(learnt, {"https://10.0.0.11:2379": None}) == [None, None, None]
    both = {"https://10.0.0.11:2379": "https://10.0.0.11:2381", "https://10.0.0.12:2379": None}
    assert member_metrics(learnt, both) == ["https://10.0.0.11:2381", None, "https://[fd00::13]:2381"]


async def test_the_quorum_proof_asks_a_learnt_member_on_its_metrics_port(setup: Any, monkeypatch: Any) -> None:
    g, store, _, _ = setup
    asked: list[tuple[str, str | None]] = []

    async def probe(endpoint: str, metrics: str | None = None, tls: Any = None) -> str:
        asked.append((endpoint, metrics))
        return "no-leader"

    monkeypatch.setattr(guard_mod, "probe_member", probe)
    g.metrics = {"https://10.0.0.11:2379": "https://10.0.0.11:2381"}
    monkeypatch.setattr(store, "endpoints", ["https://10.0.0.11:2379", "https://10.0.0.12:2379"], raising=False)
    assert await g.quorum_lost_everywhere()
    assert asked == [("https://10.0.0.11:2379", "https://10.0.0.11:2381"),
                     ("https://10.0.0.12:2379", "https://10.0.0.12:2381")]  # fmt: skip
