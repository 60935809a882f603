"""Server-sent events of a job, the Prometheus /metrics page, the metrics history and the fake driver's figures."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from kasou.hypervisor.base import LaunchDisk, LaunchSpec
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import Env

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)$')


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader of the text format 0.0.4: every line is HELP, TYPE or a well-formed sample."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            assert name not in types, f"TYPE twice for {name}"
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        name = m.group(1)
        assert name in types, f"sample before its TYPE: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.setdefault(name, []).append((labels, float(m.group(4))))
    return out


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_job_events_stream_until_the_job_ends(env: Env) -> None:
    env.create("emr1")
    r = env.api.post("/v1/vms/emr1/actions/start")
    job = r.json()["job"]
    with env.api.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        body = "".join(s.iter_text())
    events = sse_events(body)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert all(k == "job" for k in kinds[:-1]) and kinds[0] == "job"
    last_job = events[-2][1]
    assert last_job["id"] == job["id"] and last_job["state"] == "succeeded" and last_job["progress"] == 1.0
    assert events[-1][1] == {"id": job["id"], "state": "succeeded"}
    # A job that has ended: its record once, then end at once.
    again = sse_events(env.api.get(f"/v1/jobs/{job['id']}/events").text)
    assert [k for k, _ in again] == ["job", "end"]


def test_job_events_unknown_job_and_credentials(env: Env) -> None:
    assert env.api.get("/v1/jobs/jnope/events").status_code == 404
    bare = env.client()
    assert bare.get("/v1/jobs/jnope/events").status_code == 401
    assert bare.get("/v1/events/stream").status_code == 401


def test_event_stream_is_bounded(env: Env) -> None:
    r = env.api.get("/v1/events/stream", params={"timeout": 0.5})
    assert r.status_code == 200
    assert [k for k, _ in sse_events(r.text)] == ["timeout"]


def test_metrics_page_parses_and_holds_every_running_vm(env: Env) -> None:
    env.create("emr1", vcpus=2)
    env.create("lab1")
    env.act("emr1", "start")
    env.act("lab1", "start")
    r = env.api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_exposition(r.text)
    cpu = {labels["vm"]: v for labels, v in m["kasou_vm_cpu_seconds_total"]}
    assert set(cpu) == {"emr1", "lab1"}
    rss = {labels["vm"]: v for labels, v in m["kasou_vm_memory_rss_bytes"]}
    assert rss["emr1"] > 0
    disks = {(labels["vm"], labels["disk"]) for labels, _ in m["kasou_vm_disk_write_bytes_total"]}
    assert {vm for vm, _ in disks} == {"emr1", "lab1"}
    assert [labels["host"] for labels, _ in m["kasou_host_load1"]] == ["host1"]
    assert m["kasou_host_cpus"][0][1] >= 1
    info = {labels["vm"]: labels for labels, _ in m["kasou_vm_info"]}
    assert info["emr1"]["state"] == "running" and info["emr1"]["host"] == "host1"
    assert {labels["vm"]: v for labels, v in m["kasou_vm_vcpus"]}["emr1"] == 2
    # The page needs credentials: nothing without, 403 for a clinician's session.
    assert env.client().get("/metrics").status_code == 401


def test_metrics_refused_to_a_clinician(env: Env) -> None:
    r = env.api.post("/v1/users", json={"name": "nurse1", "password": "pw-nurse-123456", "role": "clinician"})
    assert r.status_code in (200, 201), r.text
    c = env.client()
    assert c.post("/v1/auth/login", json={"name": "nurse1", "password": "pw-nurse-123456"}).status_code == 200
    assert c.get("/metrics").status_code == 403
    assert c.get("/v1/metrics/history").status_code == 403


def test_metrics_history_has_rates_after_two_samples(env: Env) -> None:
    env.create("emr1")
    env.act("emr1", "start")
    first = env.api.get("/v1/metrics/history")
    assert first.status_code == 200 and first.json()["interval_s"] == 5.0
    # Two collections a moment apart give one point of rates for the VM and the host.
    from kasou.api.metrics import metrics_routes  # noqa: F401  (the collector lives in the route's closure)

    async def collect_twice() -> None:
        from kasou.control.metrics import Metrics

        m = Metrics(env.services.agents)
        await m.collect()
        await asyncio.sleep(0.3)
        await m.collect()
        h = m.history()
        assert "emr1" in h.vms and len(h.vms["emr1"]) == 1
        p = h.vms["emr1"][0]
        assert 0 < p.cpu_pct < 100 and p.rss_bytes > 0 and p.disk_read_bps > 0
        assert len(h.hosts["host1"]) == 2 and h.hosts["host1"][-1].memory_total_bytes > 0
        assert h.vm_host == {"emr1": "host1"}

    asyncio.run(collect_twice())
    cur = env.api.get("/v1/metrics").json()
    assert [v["name"] for v in cur["hosts"]["host1"]["vms"]] == ["emr1"]


def test_fake_driver_stats_are_plausible(tmp_path: Path) -> None:
    disk = tmp_path / "disk0.qcow2"
    disk.touch()  # the fake, as QEMU, refuses to start a VM whose disk is not there

    async def run() -> None:
        d = FakeDriver()
        spec = LaunchSpec(name="pacs", uuid="u", vcpus=2, memory_mib=512,
                          disks=[LaunchDisk(id="disk0", path=str(disk))])  # fmt: skip
        await d.start(spec)
        d.vms["pacs"] = d.vms["pacs"].model_copy(update={"started_at": d.vms["pacs"].started_at - 100})
        (s,) = await d.stats()
        assert s.name == "pacs" and s.state == "running"
        assert 5 <= s.cpu_seconds <= 15 and s.rss_bytes == 512 * 1024 * 1024 * 6 // 10
        assert s.disks[0].id == "disk0" and s.disk_read_bytes > s.disk_write_bytes > 0
        await d.stop("pacs")
        assert await d.stats() == []

    asyncio.run(run())
