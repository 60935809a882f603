"""Two real backup servers (``kasou backup-server serve`` processes on loopback, HTTPS with their own
certificates): a hypervisor writes to the first, the second site pulls from it with ``sync``; export and
import on removable media; the command line on a data directory."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from kasou.cli.main import app as cli_app
from kasou.errors import Conflict
from kasou.vault import immutable, policy
from kasou.vault.store import Store
from kasou.vault.sync import Primary
from tests.unit.vault.helpers import blob, fake_id, make_index
from tests.vault_servers import Server, kasou, running


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    with running(tmp_path, "site-a", "site-b") as (a, b):
        yield a, b


def backup(http: httpx.Client, vm: str, generation: int, n: int = 3) -> list[str]:
    """What a hypervisor's agent does: the missing chunks, then the index."""
    blobs = [blob(256) for _ in range(n)]
    ids = [fake_id(b) for b in blobs]
    missing = http.post("/v1/chunks/missing", json={"ids": ids}).json()["missing"]
    for cid, b in zip(ids, blobs, strict=True):
        if cid in missing:
            assert http.put(f"/v1/chunks/{cid}", content=b).status_code == 201
    r = http.post("/v1/generations", json=make_index(vm, generation, [*ids[:-1], None], ids[-1]))
    assert r.status_code == 201, r.text
    return ids


def test_sync_between_two_servers(servers: tuple[Server, Server]) -> None:
    a, b = servers
    writer = Store(a.root).add_client("hv1", "writer")
    reader = Store(a.root).add_client("site-b", "reader")
    hv = a.client(writer)
    ids = backup(hv.http, "emr-db", 1)
    backup(hv.http, "emr-db", 2)
    backup(hv.http, "pacs", 1)
    first = hv.chunk(ids[0])
    again = hv.http.put(f"/v1/chunks/{ids[0]}", content=blob(256))  # a hypervisor's root tries to overwrite it
    assert again.status_code == 200 and again.json() == {"id": ids[0], "stored": False}
    assert hv.chunk(ids[0]) == first
    hv.close()
    with pytest.raises(Conflict, match="not the pinned"):
        Primary(a.url, reader, b.fingerprint)  # site-b's own certificate: a man in the middle
    r = kasou("backup-server", "sync", "--from", a.url, "--token", reader, "--fingerprint", a.fingerprint,
              "--dir", str(b.root))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 generations copied (9 chunks" in r.stdout  # 3 x (2 disk chunks + config)
    local = Store(b.root)
    assert [(vm, local.generation_numbers(vm)) for vm in local.vms()] == [("emr-db", [1, 2]), ("pacs", [1])]
    state = local.state("emr-db", 2)
    assert state["synced_from"]["server_id"] == Store(a.root).info()["server_id"]
    assert [c["site"] for c in Store(a.root).state("emr-db", 2)["copied_to"]] == ["site-b"]  # the receipt
    assert state["locked_until"] == pytest.approx(state["received"] + 30 * 86400)
    # b serves what it pulled to its own readers
    b_reader = Store(b.root).add_client("restore", "reader")
    rb = b.client(b_reader)
    assert rb.generation("pacs", 1)["synced_from"]["url"] == a.url
    rb.close()
    # a second run copies nothing; a reader of a cannot write to it
    r = kasou("backup-server", "sync", "--from", a.url, "--token", reader, "--fingerprint", a.fingerprint,
              "--dir", str(b.root))  # fmt: skip
    assert "0 generations copied" in r.stdout
    ra = a.client(reader)
    assert ra.http.put(f"/v1/chunks/{'a' * 64}", content=blob()).status_code == 403
    ra.close()
    if local.immutable:
        assert immutable.is_immutable(local.index_path("pacs", 1))


def test_the_second_site_pulls_by_its_own_timetable(servers: tuple[Server, Server]) -> None:
    """The second site's serve pulls on its timetable (no one runs sync by hand) and tells the primary."""
    a, b = servers
    hv = a.client(Store(a.root).add_client("hv1", "writer"))
    backup(hv.http, "emr-db", 1)
    hv.close()
    reader = Store(a.root).add_client("site-b", "reader")
    runner = CliRunner()
    bad = kasou("backup-server", "timetable", "set", "--sync-every", "60", "--dir", str(b.root))
    assert bad.returncode != 0 and "needs --from URL and --token" in bad.stderr + bad.stdout, bad
    args = ["backup-server", "timetable", "set", "--from", a.url, "--token", reader, "--fingerprint", a.fingerprint,
            "--sync-every", "60", "--prune-at", "03:00", "--verify-at", "04:00", "--dir", str(b.root)]  # fmt: skip
    r = runner.invoke(cli_app, args)
    assert r.exit_code == 0 and "sync: every 60 min from" in r.output, r.output
    assert (
        reader not in (b.root / "timetable.json").read_text() or (b.root / "timetable.json").stat().st_mode & 0o077 == 0
    )
    # b's serve process was started before the timetable was set: it reads it on its next tick (20 s at most)
    local = Store(b.root)
    deadline = time.monotonic() + 60
    while not local.has_generation("emr-db", 1) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert local.has_generation("emr-db", 1), local.events()[-5:]
    deadline = time.monotonic() + 10
    while not Store(a.root).state("emr-db", 1).get("copied_to") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [c["site"] for c in Store(a.root).state("emr-db", 1)["copied_to"]] == ["site-b"]
    shown = runner.invoke(cli_app, ["backup-server", "timetable", "show", "--json", "--dir", str(b.root)])
    data = json.loads(shown.output)
    assert data["sync_token"] == "(set)" and data["last"]["sync"]["ok"], data


def test_export_import_round_trip(tmp_path: Path, store: Store) -> None:
    http_blobs = [blob() for _ in range(4)]
    ids = [fake_id(x) for x in http_blobs]
    for cid, x in zip(ids, http_blobs, strict=True):
        store.put_chunk(cid, x)
    policy.add_generation(store, make_index("emr-db", 1, [ids[0], ids[1]], ids[3]))
    policy.add_generation(store, make_index("emr-db", 2, [ids[0], ids[2]], ids[3]))
    media = tmp_path / "usb"
    runner = CliRunner()
    r = runner.invoke(cli_app, ["backup-server", "export", "--to", str(media), "--dir", str(store.root)])
    assert r.exit_code == 0, r.output
    assert "2 generations exported" in r.output
    assert "backup-server import" in (media / "README.txt").read_text()
    assert not (media / "clients.json").exists() and not (media / "tls").exists()
    other = Store.create(tmp_path / "site-c", "site-c")
    r = runner.invoke(cli_app, ["backup-server", "import", "--from", str(media), "--dir", str(other.root)])
    assert r.exit_code == 0, r.output
    assert other.generation_numbers("emr-db") == [1, 2]
    assert other.index("emr-db", 2) == store.index("emr-db", 2)
    for cid in ids:
        assert other.read_chunk(cid) == store.read_chunk(cid)
    assert other.state("emr-db", 1)["synced_from"]["server_id"] == store.info()["server_id"]
    # a damaged chunk on the media is refused, the rest imported
    third = Store.create(tmp_path / "site-d", "site-d")
    bad = media / "chunks" / ids[2][:4] / ids[2]
    bad.write_bytes(bad.read_bytes()[:-1] + b"x")
    r = runner.invoke(cli_app, ["backup-server", "import", "--from", str(media), "--dir", str(third.root)])
    assert r.exit_code == 1 and "damaged" in r.output
    assert third.generation_numbers("emr-db") == [1]


def test_the_command_line_on_a_data_directory(tmp_path: Path) -> None:
    runner = CliRunner()
    d = str(tmp_path / "vault")

    def run(*args: str, code: int = 0) -> str:
        r = runner.invoke(cli_app, ["backup-server", *args], env={"KASOU_BACKUP_SERVER_DIR": d})
        assert r.exit_code == code, r.output
        return r.output

    try:
        assert "fingerprint" in run("init", "--name", "site-a")
        token = run("client", "add", "hv1", "--role", "writer").split("token ")[1].split()[0]
        assert "writer" in run("client", "list")
        assert json.loads(run("client", "list", "--json"))[0]["name"] == "hv1"
        run("client", "add", "x", "--role", "admin", code=2)  # bad input: a usage error
        assert "yes (chattr +i)" in run("show") or "no:" in run("show")
        store = Store(Path(d))
        assert store.authenticate(token) is not None
        b1, b2 = blob(), blob()
        ids = [fake_id(b1), fake_id(b2)]
        store.put_chunk(ids[0], b1)
        store.put_chunk(ids[1], b2)
        policy.add_generation(store, make_index("emr-db", 1, [ids[0]], ids[1]))
        rows = json.loads(run("list", "--json"))
        assert rows[0]["vm"] == "emr-db" and rows[0]["locked_until"] > rows[0]["received"]
        assert "emr-db" in run("list", "--vm", "emr-db")
        assert "1 sound, 0 damaged" in run("verify")
        assert json.loads(run("list", "--json"))[0]["verified_at"] is not None
        run("policy", "set", "--vm", "emr-db", "--keep-daily", "1", "--lock-days", "60")
        assert json.loads(run("policy", "show", "--json"))["vms"]["emr-db"]["lock_days"] == 60
        assert "0 generations would be removed" in run("prune", "--dry-run")
        assert "removed 0 chunks" in run("gc")
        run("policy", "set", "--keep-daily", "-1", code=2)
    finally:
        immutable.release_tree(tmp_path)


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    d = str(tmp_path / "vault")
    runner = CliRunner()
    assert runner.invoke(cli_app, ["backup-server", "init", "--dir", d, "--name", "s"]).exit_code == 0
    r = kasou("backup-server", "serve", "--dir", d, "--listen", "0.0.0.0:8472", "--plain-http", timeout=30)
    assert r.returncode == 2 and "loopback" in r.stderr
    r = kasou("backup-server", "serve", "--dir", d, "--listen", "nonsense", timeout=30)
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = kasou("backup-server", "show", "--dir", str(tmp_path / "none"), timeout=30)
    assert r.returncode == 3 and "backup-server init" in r.stderr
