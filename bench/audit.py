"""The audit log's cost: latency of a recorded request vs the same request unrecorded, appends/s, verify time.

An in-process kasou (fake driver, SQLite store in a temporary directory, as the functional tests run it);
``PATCH /v1/vms/NAME`` (a description change: one store write) is timed with the audit middleware recording
it and with the middleware passing it through, in alternating blocks so the machine's noise hits both.

    .venv/bin/python bench/audit.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from fastapi.testclient import TestClient
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import make_fake_image

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api import audit as api_audit
from kasou.api.app import create_app
from kasou.api.deps import Services
from kasou.control.audit import AuditLog
from kasou.control.hosts import Agents
from kasou.store.sqlite import SqliteStore

TOKEN = "bench-token"


def timed(api: TestClient, n: int, recorded: bool) -> list[float]:
    api_audit.CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"}) if recorded else frozenset()  # type: ignore[misc]
    out = []
    for i in range(n):
        t = time.perf_counter()
        r = api.patch("/v1/vms/bench", json={"description": f"d{i}"})
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_fake_image(tmp / "images")
        agent = Agent(host="host1", driver=FakeDriver(), disks=LocalDisks(tmp / "disks", tmp / "images"),
                      accelerator="tcg", accelerator_reason="bench", qemu_version="7.2", images=lambda: ["tiny"])  # fmt: skip
        client = AgentClient("host1", transport=httpx.ASGITransport(app=create_agent_app(agent)))

        async def factory() -> Services:
            return Services.build(SqliteStore(tmp / "state.db"), Agents({"host1": client}), shutdown_timeout=2)

        with TestClient(create_app(factory, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            r = api.post("/v1/vms", json={"name": "bench", "image": "tiny", "vcpus": 1, "memory_mib": 64})
            job = r.json()["job"]["id"]
            while api.get(f"/v1/jobs/{job}").json()["state"] not in ("succeeded", "failed"):
                time.sleep(0.01)
            timed(api, 50, True)  # warm up
            rec: list[float] = []
            plain: list[float] = []
            block = 50
            for _ in range(max(1, args.requests // block)):
                rec += timed(api, block, True)
                plain += timed(api, block, False)
        mr, mp = statistics.median(rec) * 1000, statistics.median(plain) * 1000
        print(f"PATCH /v1/vms/NAME, {len(rec)} each, SQLite (synchronous=FULL) on {tmp}")
        print(f"  recorded:   median {mr:.2f} ms, p90 {statistics.quantiles(rec, n=10)[-1] * 1000:.2f} ms")
        print(f"  unrecorded: median {mp:.2f} ms, p90 {statistics.quantiles(plain, n=10)[-1] * 1000:.2f} ms")
        print(f"  added by the audit record: {mr - mp:+.2f} ms ({mr / mp:.2f}x)")

        async def appends() -> None:
            store = SqliteStore(tmp / "appends.db")
            log = AuditLog(store, key_path=tmp / "audit.key", host="bench", checkpoint_every=100)
            n = 1000
            t = time.perf_counter()
            for i in range(n):
                await log.append("POST /v1/vms", actor={"name": "root", "role": "admin", "via": "token"},
                                 target=f"vms/v{i}", status=202, details={"body": {"name": f"v{i}"}})  # fmt: skip
            dt = time.perf_counter() - t
            t = time.perf_counter()
            rep = await log.verify()
            vt = time.perf_counter() - t
            assert rep.ok, rep
            print(f"AuditLog.append alone: {n / dt:.0f} records/s ({dt / n * 1000:.2f} ms each, checkpoint every 100)")
            print(f"verify: {n} records and {rep.checkpoints} checkpoints in {vt * 1000:.0f} ms")
            await store.close()

        asyncio.run(appends())


if __name__ == "__main__":
    main()
