"""The QMP steps of a migration against a scripted monitor (no QEMU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kasou.errors import HypervisorError, InvalidSpec, MonitorError, OperationTimeout
from kasou.hypervisor.base import IncomingInfo
from kasou.hypervisor.qemu import migration as mig
from tests.unit.conftest import Qmp

Handler = Callable[[dict[str, Any] | None], Any]


COPY = IncomingInfo(
    storage="copy",
    migration_uri="tcp:127.0.0.1:5000",
    nbd_host="127.0.0.1",
    nbd_port=5001,
    exports={"disk0": "disk0", "disk1": "disk1"},
)


async def test_start_incoming_retries_a_taken_port() -> None:
    tries: list[str] = []

    def incoming(args: dict[str, Any] | None) -> Any:
        assert args is not None
        tries.append(args["uri"])
        return MonitorError("Failed to bind socket: Address already in use") if len(tries) == 1 else {}

    q = Qmp(migrate_incoming=incoming)
    uri = await mig.start_incoming(q, "127.0.0.1")
    assert uri == tries[-1] and len(tries) == 2
    caps = q.calls[0]
    assert caps[0] == "migrate-set-capabilities"
    assert caps[1] == {"capabilities": [{"capability": "late-block-activate", "state": True}]}


async def test_start_incoming_gives_up() -> None:
    q = Qmp(migrate_incoming=MonitorError("nope"))
    with pytest.raises(MonitorError):
        await mig.start_incoming(q, "127.0.0.1")
    assert q.names().count("migrate-incoming") == mig.PORT_ATTEMPTS


async def test_nbd_server_and_exports() -> None:
    q = Qmp()
    port = await mig.start_nbd_server(q, "127.0.0.1")
    assert q.calls[0] == (
        "nbd-server-start",
        {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}},
    )
    exports = await mig.export_disks(q, ["disk0"])
    assert exports == {"disk0": "disk0"}
    assert q.calls[1] == (
        "block-export-add",
        {"type": "nbd", "id": "exp-disk0", "node-name": "disk0", "name": "disk0", "writable": True},
    )


async def test_parameters_are_always_set() -> None:
    q = Qmp()
    await mig.set_parameters(q, 100, False, None)
    assert q.calls == [
        ("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge", "state": False}]}),
        ("migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 1024 * mig.MiB}),
    ]
    q = Qmp()
    await mig.set_parameters(q, 300, True, 8)
    assert q.calls[1][1] == {"downtime-limit": 300, "max-bandwidth": 8 * mig.MiB}


async def test_start_mirrors() -> None:
    q = Qmp()
    await mig.start_mirrors(q, COPY, ["disk0", "disk1"], 4)
    assert q.names() == ["blockdev-add", "blockdev-mirror", "blockdev-add", "blockdev-mirror"]
    add, mirror = q.calls[0][1], q.calls[1][1]
    assert add == {
        "driver": "nbd",
        "node-name": "mig-disk0",
        "server": {"type": "inet", "host": "127.0.0.1", "port": "5001"},
        "export": "disk0",
    }
    assert mirror == {
        "job-id": "mirror-disk0",
        "device": "disk0",
        "target": "mig-disk0",
        "sync": "full",
        "copy-mode": "write-blocking",
        "auto-dismiss": False,
        "speed": 4 * mig.MiB,
    }


async def test_start_mirrors_undoes_a_half_start() -> None:
    def mirror(args: dict[str, Any] | None) -> Any:
        assert args is not None
        return MonitorError("boom") if args["device"] == "disk1" else {}

    q = Qmp(blockdev_mirror=mirror, query_block_jobs=[])
    with pytest.raises(MonitorError):
        await mig.start_mirrors(q, COPY, ["disk0", "disk1"], None)
    assert ("block-job-cancel", {"device": "mirror-disk0", "force": True}) in q.calls
    dels = [a for c, a in q.calls if c == "blockdev-del"]
    assert dels == [{"node-name": "mig-disk0"}, {"node-name": "mig-disk1"}]


async def test_start_mirrors_needs_every_export() -> None:
    q = Qmp(query_block_jobs=[])
    with pytest.raises(InvalidSpec):
        await mig.start_mirrors(q, COPY, ["disk0", "disk9"], None)
    assert ("blockdev-del", {"node-name": "mig-disk0"}) in q.calls


def answers(*values: Any) -> Callable[[Any], Any]:
    """One answer per call, the last one repeated."""
    it = iter(values)
    last: list[Any] = [None]

    def next_answer(_args: Any) -> Any:
        last[0] = next(it, last[0])
        return last[0]

    return next_answer


def mj(disk: str, offset: int, length: int = 100, **kw: Any) -> dict[str, Any]:
    base = {"device": f"mirror-{disk}", "offset": offset, "len": length, "ready": offset == length}
    base["status"] = "ready" if base["ready"] else "running"
    base.update(kw)
    return base


async def test_wait_mirrors_ready() -> None:
    q = Qmp(query_block_jobs=answers([mj("disk0", 10)], [mj("disk0", 50)], [mj("disk0", 100)]))
    await mig.wait_mirrors_ready(q, ["disk0"], poll_s=0)
    assert q.names().count("query-block-jobs") == 3


async def test_wait_mirrors_ready_fails_with_the_job() -> None:
    q = Qmp(query_block_jobs=[mj("disk0", 10, status="concluded", error="No space left on device")])
    with pytest.raises(HypervisorError, match="No space left"):
        await mig.wait_mirrors_ready(q, ["disk0"], poll_s=0)


async def test_wait_mirrors_ready_notices_a_stall() -> None:
    q = Qmp(query_block_jobs=[mj("disk0", 10)])
    with pytest.raises(OperationTimeout, match="no progress"):
        await mig.wait_mirrors_ready(q, ["disk0"], stall_s=0.05, poll_s=0.01)


async def test_wait_mirrors_ready_hard_bound() -> None:
    n = iter(range(10**6))
    q = Qmp(query_block_jobs=lambda _a: [mj("disk0", next(n), 10**7)])
    with pytest.raises(OperationTimeout, match="took over"):
        await mig.wait_mirrors_ready(q, ["disk0"], max_s=0.05, poll_s=0.01)


async def test_finish_mirrors_completes_and_dismisses() -> None:
    q = Qmp(query_block_jobs=answers([mj("disk0", 100)], [mj("disk0", 100, status="concluded")]))
    await mig.finish_mirrors(q, ["disk0"], force=False)
    assert q.calls[0] == ("block-job-cancel", {"device": "mirror-disk0", "force": False})
    assert q.calls[-1] == ("job-dismiss", {"id": "mirror-disk0"})


async def test_finish_mirrors_reports_a_failed_final_sync() -> None:
    q = Qmp(query_block_jobs=[mj("disk0", 90, status="concluded", error="Input/output error")])
    with pytest.raises(HypervisorError, match="final sync"):
        await mig.finish_mirrors(q, ["disk0"], force=False)
    assert q.calls[-1] == ("job-dismiss", {"id": "mirror-disk0"})
    # An abort does not care.
    await mig.finish_mirrors(q, ["disk0"], force=True)


async def test_finish_mirrors_is_bounded() -> None:
    q = Qmp(query_block_jobs=[mj("disk0", 100)])
    with pytest.raises(OperationTimeout):
        await mig.finish_mirrors(q, ["disk0"], force=False, timeout=0.05)


async def test_cancel_migration() -> None:
    q = Qmp(query_migrate=answers({"status": "active"}, {"status": "cancelling"}, {"status": "cancelled"}))
    await mig.cancel_migration(q)
    assert q.names() == ["query-migrate", "migrate_cancel", "query-migrate", "query-migrate"]
    idle = Qmp(query_migrate={"status": "completed"})
    await mig.cancel_migration(idle)
    assert idle.names() == ["query-migrate"]


async def test_wait_incoming_done() -> None:
    q = Qmp(
        query_migrate=answers({"status": "active"}, {"status": "completed"}),
        query_status={"status": "paused"},
    )
    await mig.wait_incoming_done(q)
    bad = Qmp(query_migrate={"status": "failed", "error-desc": "load failed"}, query_status={"status": "inmigrate"})
    with pytest.raises(HypervisorError, match="load failed"):
        await mig.wait_incoming_done(bad)
    stuck = Qmp(query_migrate={"status": "active"}, query_status={"status": "inmigrate"})
    with pytest.raises(OperationTimeout):
        await mig.wait_incoming_done(stuck, timeout=0.05)
