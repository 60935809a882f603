"""The files an agent makes are private to root, in every mode (unix socket or TCP, one host or a cluster):
it runs with umask 077, and its disk, shared, pool and backup directories are forced to 0700 when it starts."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.storage import LocalDisks
from kasou.config import private_dir_mode
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import make_fake_image


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def cluster_agent(tmp_path: Path) -> Agent:
    """An agent as a cluster host builds it: disks, shared storage, a known pool and a backup directory."""
    images = tmp_path / "images"
    make_fake_image(images)
    for d in ("home/disks", "shared", "pools/ssd", "backups"):
        (tmp_path / d).mkdir(parents=True)
        os.chmod(tmp_path / d, 0o755)  # as an operator's mkdir under the usual umask 022 leaves them
    (tmp_path / "home" / "pools.json").write_text(json.dumps({"ssd": str(tmp_path / "pools" / "ssd")}))
    return Agent(
        host="h1", driver=FakeDriver(), disks=LocalDisks(tmp_path / "home" / "disks", images, tmp_path / "shared"),
        accelerator="tcg", accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"],
        migration_address="10.0.0.1", backup_dir=tmp_path / "backups",
    )  # fmt: skip


def test_a_cluster_agent_makes_disks_and_backups_private(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = os.umask(0o022)  # the usual umask of whoever starts it
    try:
        with caplog.at_level(logging.WARNING), TestClient(create_agent_app(cluster_agent(tmp_path))) as c:
            for d in ("home/disks", "shared", "pools/ssd", "backups"):
                assert mode(tmp_path / d) == private_dir_mode(), d  # forced at start (0711 confined) ...
                assert str(tmp_path / d) in caplog.text  # ... and said so
            body = {"vm": "emr", "disk_id": "disk0", "source": "image", "image": "tiny"}
            r = c.post("/agent/v1/disks", json=body)
            assert r.status_code == 200, r.text
            disk = Path(r.json()["path"])
            body = {"vm": "emr", "disk_id": "disk1", "size_bytes": 1 << 20, "pool": "ssd",
                    "pool_path": str(tmp_path / "pools" / "ssd")}  # fmt: skip
            r = c.post("/agent/v1/disks", json=body)
            assert r.status_code == 200, r.text
            pooled = Path(r.json()["path"])
            backup = {"generation": 1, "backup_id": "bk01", "disks": [{"disk_id": "disk0", "path": str(disk)}]}
            r = c.post("/agent/v1/vms/emr/backups", json=backup)
            assert r.status_code == 200, r.text
            made = Path(r.json()["files"][0]["path"])
            for f in (disk, pooled, made, made.with_name(made.name + ".json")):
                assert mode(f) & 0o077 == 0, f"{f} is {oct(mode(f))}"
            for d in (disk.parent, pooled.parent, made.parent, made.parent.parent):
                assert mode(d) == 0o700, f"{d} is {oct(mode(d))}"
    finally:
        os.umask(before)


def test_an_agent_that_cannot_make_its_directory_private_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = cluster_agent(tmp_path)
    real_chmod = os.chmod

    def refuse(path: object, m: int, *a: object, **kw: object) -> None:
        if str(path) == str(tmp_path / "shared"):
            raise PermissionError(1, "Operation not permitted")  # e.g. a root-squashed NFS mount
        real_chmod(path, m, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", refuse)
    with (
        pytest.raises(Exception, match=r"shared.*0o7[01][01]|0o7[01][01].*shared"),
        TestClient(create_agent_app(agent)),
    ):
        pass


def test_an_agent_takes_pools_only_under_the_storage_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A control plane (or anyone who reaches the agent) cannot make /root or /etc/cron.d a disk directory."""
    agent = cluster_agent(tmp_path)
    monkeypatch.setenv("KASOU_STORAGE_ROOTS", str(tmp_path / "pools"))
    # a pools.json of before: entries outside the roots give no disk directory
    (tmp_path / "home" / "pools.json").write_text(json.dumps({"ssd": str(tmp_path / "pools" / "ssd"), "r": "/root"}))
    with TestClient(create_agent_app(agent)) as c:
        for path in ("/root", "/etc/cron.d", "/var/lib/kasou", str(tmp_path / "home"), str(tmp_path / "elsewhere")):
            r = c.post("/agent/v1/pools/usage", json=[{"name": "x", "path": path}])
            assert r.status_code == 422 and path in r.json()["message"], r.text
            body = {"vm": "emr", "disk_id": "disk0", "size_bytes": 1 << 20, "pool": "x", "pool_path": path}
            assert c.post("/agent/v1/disks", json=body).status_code == 422
        assert not agent.disks.is_disk_path("/root/.ssh/authorized_keys")
        assert c.post("/agent/v1/disks/delete", json={"path": "/root/.bashrc"}).status_code == 422
        assert agent.disks.is_disk_path(tmp_path / "pools" / "ssd" / "emr" / "disk0.qcow2")
        assert json.loads((tmp_path / "home" / "pools.json").read_text()).keys() == {"ssd", "r"}  # nothing added
