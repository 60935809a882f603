"""``GET /v1/vms?watch=true`` and ``GET /v1/events?watch=true`` on the SQLite store, in process: the list first,
then each change within a short bound, pushed by the store's change notifications (nothing polls). Every
stream here is bounded by its ``timeout`` parameter, and every wait for an event by WAIT_S."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api import watches as watches_module
from kasou.api.app import create_app
from kasou.api.deps import Services
from kasou.control.hosts import Agents
from kasou.store import sqlite as sqlite_module
from kasou.store.etcd import EtcdStore
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import TOKEN, Env, make_fake_image
from tests.functional.test_maintenance_windows import Clock, clock, opened, signed_in  # noqa: F401 - clock: a fixture
from tests.unit.test_store_contract import etcd_endpoints  # noqa: F401 - the session's etcd (marker etcd)

WAIT_S = 3.0  # a change shows on the stream within this (measured: a few milliseconds)
STREAM_S = 15  # each stream's own bound (its timeout parameter)
VOLATILE = ("uptime_s", "heartbeat_age_s")


@dataclass
class Stream:
    """Server-sent events read by a thread as they arrive: (arrival time, ``time.time()``, event, data)."""

    events: queue.Queue[tuple[float, str, Any]] = field(default_factory=queue.Queue)
    status: int = 0
    content_type: str = ""

    def next(self, within: float = WAIT_S) -> tuple[float, str, Any]:
        try:
            return self.events.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"no event within {within} s") from None

    def until(self, kind: str, name: str, within: float = WAIT_S) -> tuple[float, Any]:
        """The next ``kind`` event about VM ``name`` (others on the way are passed over)."""
        deadline = time.monotonic() + within
        while True:
            at, event, data = self.next(max(0.01, deadline - time.monotonic()))
            if event == kind and isinstance(data, dict) and data.get("name") == name:
                return at, data

    def quiet(self, within: float = 0.5) -> None:
        with pytest.raises(queue.Empty):
            got = self.events.get(timeout=within)
            pytest.fail(f"an event that should not be: {got}")


@contextmanager
def watching(client: TestClient, path: str = "/v1/vms", **params: Any) -> Iterator[Stream]:
    stream = Stream()
    ready = threading.Event()

    def read() -> None:
        try:
            follow()
        except Exception:
            if not stream_closed.is_set():  # closed by the test: how a reader stops early
                raise

    def follow() -> None:
        with client.stream("GET", path, params={"watch": "true", "timeout": STREAM_S, **params}) as r:
            held.append(r)
            stream.status, stream.content_type = r.status_code, r.headers.get("content-type", "")
            ready.set()
            event, data = "", ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and event:
                    stream.events.put((time.time(), event, json.loads(data)))  # wall clock: comparable across processes
                    event, data = "", ""
                    if stream_closed.is_set():
                        return

    stream_closed = threading.Event()
    held: list[Any] = []
    reader = threading.Thread(target=read, name="sse-reader", daemon=True)
    reader.start()
    assert ready.wait(WAIT_S), "the stream did not start"
    assert stream.status == 200, f"{path}: {stream.status}"
    try:
        yield stream
    finally:
        stream_closed.set()
        for r in held:
            r.close()
        reader.join(STREAM_S + 5)
        assert not reader.is_alive(), "the stream did not end within its timeout"


def plain(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in view.items() if k not in VOLATILE} for view in views]


def test_the_list_first_then_each_change_as_it_happens(env: Env) -> None:
    env.create("emr1", tags=["emr"])
    with watching(env.api) as s:
        assert s.status == 200 and s.content_type.startswith("text/event-stream")
        _, event, first = s.next()
        assert event == "list"
        assert plain(first) == plain(env.api.get("/v1/vms").json())  # the same body as the plain list
        # A change of the record: modified, within the bound.
        written = time.time()
        assert env.api.patch("/v1/vms/emr1", json={"description": "electronic records"}).status_code == 200
        at, view = s.until("modified", "emr1")
        assert view["description"] == "electronic records"
        assert view == {**env.api.get("/v1/vms/emr1").json(), **{k: view[k] for k in VOLATILE}}
        print(f"SQLite watch: PATCH sent to modified event received in {(at - written) * 1000:.1f} ms")
        assert at - written < WAIT_S
        # A new VM: added (then modified as its create job moves it on); started: modified to running.
        r = env.api.post("/v1/vms", json={"name": "pacs1", "image": "tiny", "vcpus": 1, "memory_mib": 128})
        assert r.status_code == 202
        _, added = s.until("added", "pacs1")
        assert added["state"] == "creating"
        env.wait(r.json()["job"])
        env.act("pacs1", "start")
        deadline = time.monotonic() + WAIT_S
        while s.until("modified", "pacs1")[1]["state"] != "running":
            assert time.monotonic() < deadline
        # Deleted: its last view.
        env.act("pacs1", "stop")
        r = env.api.delete("/v1/vms/pacs1")
        env.wait(r.json()["job"])
        _, gone = s.until("deleted", "pacs1")
        assert gone["name"] == "pacs1"


def test_filters_and_scope_as_the_list(env: Env) -> None:
    env.create("lab1", department="lab", tags=["a"])
    env.create("lab2", department="lab")
    env.create("pacs1", department="pacs", tags=["a"])
    manager = signed_in(env, "m", "manager", ["lab"])
    with watching(manager, tag=["a"]) as s:
        _, event, first = s.next()
        assert event == "list" and [v["name"] for v in first] == ["lab1"]
        assert plain(first) == plain(manager.get("/v1/vms", params={"tag": ["a"]}).json())
        # Into the filter: added; out of it: deleted; another department's VM never shows.
        env.api.patch("/v1/vms/lab2", json={"tags": ["a", "b"]})
        s.until("added", "lab2")
        env.api.patch("/v1/vms/pacs1", json={"description": "not theirs"})
        env.api.patch("/v1/vms/lab1", json={"tags": []})
        _, left = s.until("deleted", "lab1")
        assert left["name"] == "lab1"
        env.api.patch("/v1/vms/pacs1", json={"department": "lab"})  # moved into their department: shown
        s.until("added", "pacs1")
        env.api.patch("/v1/vms/pacs1", json={"department": "pacs"})
        s.until("deleted", "pacs1")
        s.quiet()
    vendor = signed_in(env, "v", "vendor", ["lab"])  # no active window: sees nothing, and no change of it
    with watching(vendor) as s:
        assert s.next()[1:] == ("list", [])
        env.api.patch("/v1/vms/lab1", json={"description": "vendor's system"})
        s.quiet()


def test_bad_input_is_refused_before_any_stream(env: Env) -> None:
    r = env.api.get("/v1/vms", params={"watch": "true", "state": "sleeping"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    r = env.api.get("/v1/vms", params={"watch": "true", "tag": "no spaces"})
    assert r.status_code == 422
    assert env.api.get("/v1/vms", params={"watch": "perhaps"}).status_code == 422
    assert env.api.get("/v1/vms", params={"watch": "true", "timeout": 0}).status_code == 422
    assert env.api.get("/v1/vms", params={"watch": "false"}).json() == []
    assert env.client().get("/v1/vms", params={"watch": "true"}).status_code == 401
    r = env.api.get("/v1/vms", params={"watch": "1", "timeout": 0.2})  # bounded: list, then timeout
    assert r.status_code == 200
    assert [line for line in r.text.splitlines() if line.startswith("event: ")] == ["event: list", "event: timeout"]


def test_a_closed_stream_releases_its_watch(env: Env) -> None:
    path = str(env.tmp / "state.db")
    with env.api.stream("GET", "/v1/vms", params={"watch": "true", "timeout": STREAM_S}) as r:
        for line in r.iter_lines():
            if line.startswith("event: list"):
                break
        assert sqlite_module.registered(path) == 1
    deadline = time.monotonic() + WAIT_S
    while sqlite_module.registered(path) != 0:
        assert time.monotonic() < deadline, "the watch outlived its stream"
        time.sleep(0.02)


def test_events_watch(env: Env) -> None:
    env.create("emr1")
    assert env.api.portal is not None
    env.api.portal.call(env.services.vms.events.emit, "test_old", "vm/emr1", "before", "info")
    with watching(env.api, "/v1/events", severity="warning") as s:
        _, event, first = s.next()
        assert event == "list" and first == env.api.get("/v1/events", params={"severity": "warning"}).json()
        written = time.time()
        env.api.portal.call(env.services.vms.events.emit, "disk_degraded", "vm/emr1", "disk0 lost its copy", "error")
        env.api.portal.call(env.services.vms.events.emit, "note", "vm/emr1", "below the severity", "info")
        at, event, data = s.next()
        assert event == "event" and (data["kind"], data["severity"]) == ("disk_degraded", "error")
        assert at - written < WAIT_S
        s.quiet()


# -- a cluster's store: etcd ---------------------------------------------------------------------------------

OTHER_CONTROL_PLANE = """
import asyncio, sys, time
from kasou.control.base import VMRecords
from kasou.store.etcd import EtcdStore

async def main(endpoints, prefix, name, text):
    store = EtcdStore(endpoints.split(","), prefix=prefix)
    try:
        await VMRecords(store).set(name, description=text)  # as another host's control plane changes a record
        print(time.time(), flush=True)  # when the write was acknowledged
    finally:
        await store.close()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
def etcd_env(tmp_path: Path, etcd_endpoints: list[str]) -> Iterator[tuple[Env, str]]:  # noqa: F811
    """The in-process kasou of ``env``, its state in etcd (a namespace of its own in the session's etcd)."""
    images = tmp_path / "images"
    make_fake_image(images)
    driver = FakeDriver()
    agent = Agent(host="host1", driver=driver, disks=LocalDisks(tmp_path / "disks", images), accelerator="tcg",
                  accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"])  # fmt: skip
    agent_client = AgentClient("host1", transport=httpx.ASGITransport(app=create_agent_app(agent)))
    prefix = f"/kasou-test/{uuid.uuid4().hex}/"
    holder: dict[str, Services] = {}

    async def factory() -> Services:
        store = EtcdStore(etcd_endpoints, prefix=prefix, timeout=5.0)
        holder["svc"] = Services.build(store, Agents({"host1": agent_client}), shutdown_timeout=2)
        return holder["svc"]

    with TestClient(create_app(factory, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield Env(api, driver, holder["svc"], tmp_path, agent), prefix


@pytest.mark.etcd
def test_etcd_a_change_by_another_control_plane_process_shows(
    etcd_env: tuple[Env, str],
    etcd_endpoints: list[str],  # noqa: F811
) -> None:
    env, prefix = etcd_env
    env.create("emr1")
    with watching(env.api) as s:
        assert [v["name"] for v in s.next()[2]] == ["emr1"]
        latencies = []
        for n in range(3):
            text = f"changed by another control plane ({n})"
            out = subprocess.run(
                [sys.executable, "-c", OTHER_CONTROL_PLANE, ",".join(etcd_endpoints), prefix, "emr1", text],
                capture_output=True, text=True, timeout=60, check=True, env=os.environ.copy(),
            )  # fmt: skip
            written = float(out.stdout.split()[-1])
            at, view = s.until("modified", "emr1")
            latencies.append(at - written)
            assert view["description"] == text
        print("etcd watch: a change by another process shows after", [f"{x * 1000:.1f} ms" for x in latencies])
        assert max(latencies) < WAIT_S


def test_a_session_signed_out_ends_its_streams(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watches_module, "REFRESH_S", 0.3)  # credentials checked again this often (30 s in service)
    env.create("lab1", department="lab")
    manager = signed_in(env, "m", "manager", ["lab"])
    auditor = signed_in(env, "a", "auditor")
    with watching(manager) as s, watching(auditor, "/v1/events") as e:
        assert s.next()[1] == "list" and e.next()[1] == "list"
        for user in ("m", "a"):  # an administrator ends the users' sessions
            assert env.api.post(f"/v1/users/{user}/signout").status_code == 200
        for stream in (s, e):
            _, event, data = stream.next()
            assert event == "error" and data["code"] == "unauthorized", data


def test_a_vendors_stream_follows_their_windows(
    env: Env,
    clock: Clock,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watches_module, "WINDOWED_REFRESH_S", 0.3)  # 5 s in service
    env.create("lab1", department="lab")
    vendor = signed_in(env, "v", "vendor", ["lab"])
    with watching(vendor) as s:
        assert s.next()[1:] == ("list", [])
        window = opened(env, vendor, clock, ["lab1"])  # approved, active now: lab1 comes into their view
        s.until("added", "lab1")
        clock.now = window["ends_at"] + 1  # it ended: out of their view again
        s.until("deleted", "lab1")
