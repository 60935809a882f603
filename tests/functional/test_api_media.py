"""Installing from an ISO through the API and the CLI (fake driver): ISO images, --cdrom and --boot on create,
media insert and eject on running and stopped VMs, the refusals (one line each, nothing changed), and a
live migration refused where the destination lacks the ISO."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kasou.agent.app import Agent, create_agent_app
from kasou.agent.client import AgentClient
from kasou.agent.storage import LocalDisks
from kasou.api.app import create_app
from kasou.api.client import Client
from kasou.api.deps import Services
from kasou.cli import common
from kasou.cli.main import app as cli_app
from kasou.config import HaTimes
from kasou.control.hosts import Agents
from kasou.image import import_image
from kasou.model.state import VMState
from kasou.store.sqlite import SqliteStore
from tests.cli_errors import error_of
from tests.doubles.driver import FakeDriver
from tests.functional.conftest import TOKEN, Cluster, Env, make_fake_image

ISO = "installer"


def tiny_iso(path: Path, blocks: int = 20) -> Path:
    """A minimal ISO 9660 file: a primary volume descriptor (sector 16) and the set terminator (17)."""
    data = bytearray(blocks * 2048)
    pvd = 16 * 2048
    data[pvd : pvd + 7] = b"\x01CD001\x01"
    struct.pack_into("<I", data, pvd + 80, blocks)
    struct.pack_into("<H", data, pvd + 128, 2048)
    data[17 * 2048 : 17 * 2048 + 7] = b"\xffCD001\x01"
    path.write_bytes(bytes(data))
    return path


def with_iso(images: Path, tmp: Path, name: str = ISO) -> None:
    art = import_image(images, name, tiny_iso(tmp / f"{name}.iso"))
    assert (art.kind, art.firmware) == ("iso", ())


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return str(r.json()["message"])


def media(env: Env | Cluster, vm: str, iso: str | None) -> dict:
    """Insert ``iso`` (None: eject), follow the job to its end; the VM as it is then."""
    r = env.api.post(f"/v1/vms/{vm}/media", json={"iso": iso}) if iso else env.api.delete(f"/v1/vms/{vm}/media")
    assert r.status_code == 202, r.text
    job = env.wait(r.json()["job"])
    assert job["state"] == "succeeded" and job["kind"] == "media", job
    return dict(env.api.get(f"/v1/vms/{vm}").json())


def test_install_from_an_iso_then_change_the_disc(env: Env) -> None:
    with_iso(env.tmp / "images", env.tmp)
    vm = env.create("emr", image=None, cdrom=ISO, boot="cdrom,disk", disk="1G", memory_mib=256)
    assert (vm["cdrom_drive"], vm["cdrom"], vm["boot"], vm["image"]) == (True, ISO, ["cdrom", "disk"], None)
    assert vm["disks"][0]["size_bytes"] == 1 << 30 and vm["disks"][0]["backing"] is None  # a blank disk
    env.act("emr", "start")
    spec = env.driver.specs["emr"]
    assert (spec.cdrom_drive, spec.cdrom, spec.boot, spec.image) == (True, ISO, ["cdrom", "disk"], None)

    # Running: the disc leaves the drive, and the record says so.
    assert media(env, "emr", None)["cdrom"] is None
    assert env.driver.specs["emr"].cdrom is None
    assert "already empty" in error(env.api.delete("/v1/vms/emr/media"), 409)
    assert "no ISO image 'nope' on host host1" in error(env.api.post("/v1/vms/emr/media", json={"iso": "nope"}), 422)
    assert "disk image, not an ISO" in error(env.api.post("/v1/vms/emr/media", json={"iso": "tiny"}), 422)
    assert error(env.api.post("/v1/vms/emr/media", json={"iso": "../x"}), 422).startswith("iso")
    assert env.driver.specs["emr"].cdrom is None and env.api.get("/v1/vms/emr").json()["cdrom"] is None
    assert media(env, "emr", ISO)["cdrom"] == ISO
    assert env.driver.specs["emr"].cdrom == ISO

    # Stopped: the record only; the next start puts it in (or not).
    env.act("emr", "stop")
    assert media(env, "emr", None)["cdrom"] is None
    env.act("emr", "start")
    assert env.driver.specs["emr"].cdrom is None and env.driver.specs["emr"].cdrom_drive


def test_create_refusals_leave_nothing(env: Env) -> None:
    with_iso(env.tmp / "images", env.tmp)
    cases = [
        ({"image": None, "cdrom": ISO}, 422, "needs a blank disk"),
        ({"boot": "cdrom,disk"}, 422, "no CD drive"),
        ({"cdrom": ISO, "boot": "floppy"}, 422, "boot must name devices"),
        ({"cdrom": ISO, "boot": "disk,disk"}, 422, "names a device twice"),
        ({"image": ISO}, 422, "is an ISO: install from it with --cdrom"),
        ({"cdrom": "tiny"}, 422, "disk image, not an ISO"),
        ({"cdrom": "missing"}, 422, "no host has an ISO image 'missing'"),
    ]
    for extra, status, says in cases:
        body = {"name": "bad", "image": "tiny", "vcpus": 1, "memory_mib": 128, "disk": None, **extra}
        if "cdrom" in extra and extra.get("image", "tiny") is None:
            body.pop("disk")
        assert says in error(env.api.post("/v1/vms", json=body), status), extra
    assert env.api.get("/v1/vms").json() == [] and env.disk_files() == []


def test_a_vm_without_a_drive(env: Env) -> None:
    with_iso(env.tmp / "images", env.tmp)
    env.create("lab", start=True)
    assert "cannot be added while it runs" in error(env.api.post("/v1/vms/lab/media", json={"iso": ISO}), 409)
    assert "has no CD drive" in error(env.api.delete("/v1/vms/lab/media"), 409)
    assert not env.driver.specs["lab"].cdrom_drive
    env.act("lab", "stop")
    assert media(env, "lab", ISO)["cdrom_drive"]  # stopped: it gets one
    env.act("lab", "start")
    assert (env.driver.specs["lab"].cdrom_drive, env.driver.specs["lab"].cdrom) == (True, ISO)


def test_cli_create_insert_eject_show(env: Env) -> None:
    with_iso(env.tmp / "images", env.tmp)
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        r = runner.invoke(cli_app, ["vm", "create", "db", "--cdrom", ISO, "--disk", "1G", "--boot", "cdrom,disk"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(cli_app, ["vm", "show", "db"])
        assert r.exit_code == 0 and f"{ISO} (boot cdrom,disk)" in r.output, r.output
        r = runner.invoke(cli_app, ["vm", "media", "eject", "db"])
        assert r.exit_code == 0 and "CD drive empty" in r.output, r.output
        r = runner.invoke(cli_app, ["vm", "media", "eject", "db"])  # kasou.cli.main.main prints the error's line
        assert r.exit_code == 4 and "already empty" in error_of(r), r.output
        r = runner.invoke(cli_app, ["vm", "media", "insert", "db", ISO])
        assert r.exit_code == 0 and "from its next start" in r.output, r.output
        r = runner.invoke(cli_app, ["vm", "media", "insert", "db", "nope"])
        assert r.exit_code != 0 and "kasou image import nope FILE.iso" in error_of(r), r.output
    finally:
        common.client_factory = None


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[Cluster]:
    """Two hosts, each with its own image store (the ISO is imported on one of them only)."""
    drivers: dict[str, FakeDriver] = {}
    clients = {}
    for i, host in enumerate(("h1", "h2"), 1):
        images = tmp_path / host / "images"
        make_fake_image(images)
        drivers[host] = FakeDriver()
        agent = Agent(
            host=host, driver=drivers[host], disks=LocalDisks(tmp_path / host / "disks", images, tmp_path / "shared"),
            accelerator="tcg", accelerator_reason="test", qemu_version="7.2", images=lambda: ["tiny"],
            migration_address=f"10.0.0.{i}",
        )  # fmt: skip
        clients[host] = AgentClient(host, transport=httpx.ASGITransport(app=create_agent_app(agent)))
    holder: dict[str, Services] = {}

    async def factory() -> Services:
        holder["svc"] = Services.build(
            SqliteStore(tmp_path / "state.db"),
            Agents(clients, records={h: {"disks_dir": str(tmp_path / h / "disks")} for h in ("h1", "h2")}),
            shutdown_timeout=2,
            ha=HaTimes(lease_ttl_s=6, fence_margin_s=0.2, heartbeat_timeout_s=5),
        )
        return holder["svc"]

    with TestClient(create_app(factory, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield Cluster(api, drivers, tmp_path, holder)


def test_migration_needs_the_iso_on_the_destination(two_stores: Cluster) -> None:
    c = two_stores
    for host in ("h1", "h2"):
        with_iso(c.tmp / host / "images", c.tmp / host)
    with_iso(c.tmp / "h1" / "images", c.tmp / "h1", "drivers")  # on h1 only
    vm = c.create("pacs", image=None, cdrom="drivers", disk="1G", storage="shared", start=True)
    assert vm["host"] == "h1"  # the only host with its ISO
    r = c.api.post("/v1/vms/pacs/migrate", json={"to": "h2"})
    says = error(r, 409)
    assert "ISO image 'drivers'" in says and "kasou vm media eject pacs" in says and "kasou image import" in says
    assert c.api.get("/v1/vms/pacs").json()["host"] == "h1"
    r = c.api.post("/v1/hosts/h1/maintenance")
    assert "cannot put h1 in maintenance" in error(r, 409)
    # An ISO both hosts have travels; so does an empty drive.
    assert media(c, "pacs", ISO)["cdrom"] == ISO
    job = c.wait(c.api.post("/v1/vms/pacs/migrate", json={"to": "h2"}).json()["job"])
    assert job["state"] == "succeeded", job
    assert c.drivers["h2"].specs["pacs"].cdrom == ISO


def test_a_disc_change_holds_the_vm(env: Env) -> None:
    """While another job holds the VM a change is refused; during a change nothing else runs on the VM."""
    with_iso(env.tmp / "images", env.tmp)
    env.create("ris", cdrom=ISO, start=True)
    records = env.services.vms.records
    rec = env.api.portal.call(lambda: records.set("ris", job="j-other"))
    assert rec.state == VMState.RUNNING
    assert "busy with job j-other" in error(env.api.delete("/v1/vms/ris/media"), 409)
    env.api.portal.call(lambda: records.set("ris", job=None))
    assert media(env, "ris", None)["job"] is None  # released at the end


def test_ha_restarts_a_vm_without_a_disc_its_new_host_lacks(two_stores: Cluster) -> None:
    c = two_stores
    with_iso(c.tmp / "h1" / "images", c.tmp / "h1", "drivers")  # on h1 only
    c.create("ward", image=None, cdrom="drivers", disk="1G", storage="shared", ha=True, start=True)
    assert c.host_of("ward") == "h1"
    c.fail_host("h1")

    def restarted() -> dict | None:
        v = c.api.get("/v1/vms/ward").json()
        return v if v["host"] == "h2" and v["state"] == "running" and v["job"] is None else None

    v = c.wait_for("the HA restart on h2", restarted)
    assert (v["cdrom_drive"], v["cdrom"]) == (True, None) and c.drivers["h2"].specs["ward"].cdrom is None
    events = [e for e in c.api.get("/v1/events").json() if e["kind"] == "vm_cd_dropped"]
    assert len(events) == 1 and "kasou vm media insert ward drivers" in events[0]["message"], events
