"""The audit chain: append, verify, and every kind of tampering detected and located; on SQLite and etcd."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kasou.control.audit import AuditLog, chain, keys
from kasou.store.base import Store
from tests.unit.test_store_contract import Opener, etcd_endpoints, open_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestAssertRewriteWarning")

ANCHORS = "audit-anchors.jsonl"


@pytest.fixture(autouse=True)
def _anchor_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every log of a test anchors its checkpoints in the test's own directory."""
    monkeypatch.setenv("KASOU_AUDIT_ANCHOR", str(tmp_path / ANCHORS))


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[Store]:  # noqa: F811
    s = open_store()
    yield s
    await s.close()


def make_log(store: Store, tmp_path: Path, every: int = 5, **kw: object) -> AuditLog:
    return AuditLog(store, key_path=tmp_path / "audit.key", host="h1", checkpoint_every=every,
                    checkpoint_minutes=60, **kw)  # type: ignore[arg-type]  # fmt: skip


async def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        await log.append("POST /v1/vms", actor={"name": "root", "role": "admin", "via": "token"}, source="10.0.0.9",
                         target=f"vms/vm{i}", status=202, details={"i": i})  # fmt: skip


async def raw(store: Store, seq: int) -> dict:
    e = await store.get(chain.seq_key(seq))
    assert e is not None
    return dict(e.value)


async def test_append_and_verify(store: Store, tmp_path: Path) -> None:
    log = make_log(store, tmp_path)
    assert (await log.verify()).ok
    await fill(log, 12)
    rep = await log.verify()
    assert rep.ok and rep.problem is None, rep
    assert (rep.records, rep.first_seq, rep.last_seq, rep.checkpoints, rep.last_checkpoint, rep.unsealed) == (
        12, 1, 12, 2, 10, 2)  # fmt: skip
    r1, r2 = await raw(store, 1), await raw(store, 2)
    assert r1["prev_hash"] == chain.GENESIS and r2["prev_hash"] == r1["hash"]
    assert r1["actor"] == {"name": "root", "role": "admin", "via": "token"} and r1["host"] == "h1"
    assert r1["time"].endswith("Z") and r1["result"] == {"ok": True, "status": 202, "code": None, "message": ""}
    assert r1["clock"] in ("synced", "unsynced", "unknown")
    assert oct((tmp_path / "audit.key").stat().st_mode & 0o777) == "0o600"
    # A second writer (another API server) on the same store continues the same chain.
    other = make_log(store, tmp_path)
    await other.append("login", target="users/bob")
    await log.append("logout", target="users/bob")  # its cached head is stale: it follows the chain
    rep = await log.verify()
    assert rep.ok and rep.last_seq == 14, rep
    assert log.stats["conflicts"] == 1
    assert [r["action"] for r in await log.records(action="log")] == ["login", "logout"]
    assert len(await log.records(target="vms/vm1")) == 3  # vm1, vm10, vm11: a prefix
    assert len(await log.records(actor="root")) == 12


async def test_concurrent_appends_make_one_chain(store: Store, tmp_path: Path) -> None:
    a, b = make_log(store, tmp_path, every=7), make_log(store, tmp_path, every=7)
    await asyncio.gather(fill(a, 15), fill(b, 15), fill(a, 5))
    rep = await a.verify()
    assert rep.ok and rep.records == 35, rep


async def test_secrets_are_redacted(store: Store, tmp_path: Path) -> None:
    log = make_log(store, tmp_path)
    await log.append("POST /v1/users", details={"body": {"name": "bob", "password": "hunter2-secret",
                     "nested": [{"api_token": "tok-123"}], "vnc_ticket": "tkt", "Cookie": "c"}})  # fmt: skip
    text = str(await raw(store, 1))
    for secret in ("hunter2-secret", "tok-123", "tkt", "'c'"):
        assert secret not in text
    assert (await raw(store, 1))["details"]["body"]["name"] == "bob"
    await log.append("x", details={"blob": ["y" * 400] * 40})
    assert (await raw(store, 2))["details"] == {"truncated": True, "keys": ["blob"]}


# -- tampering: each kind found, at the right place -------------------------------------------


async def tampered(store: Store, tmp_path: Path, n: int = 12) -> AuditLog:
    log = make_log(store, tmp_path)
    await fill(log, n)
    assert (await log.verify()).ok
    return log


async def test_edited_record(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    v = await raw(store, 7)
    v["actor"]["name"] = "someone-else"
    await store.put(chain.seq_key(7), v)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("edited", 7) and "changed" in p.message


async def test_edited_record_with_its_hash_recomputed(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    v = await raw(store, 7)
    v["result"]["ok"] = False
    v["hash"] = chain.digest(v)
    await store.put(chain.seq_key(7), v)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("reordered", 8) and "record 7 was rewritten" in p.message


async def test_deleted_record(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    await store.delete(chain.seq_key(4))
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("deleted", 4) and "goes on at 5" in p.message


async def test_deleted_first_records(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    await store.delete(chain.seq_key(1))
    await store.delete(chain.seq_key(2))
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("deleted", 1) and "records 1 to 2" in p.message


async def test_swapped_records(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    a, b = await raw(store, 5), await raw(store, 6)
    await store.put(chain.seq_key(5), b)
    await store.put(chain.seq_key(6), a)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("reordered", 5) and "says it is record 6" in p.message


async def test_swapped_records_renumbered(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    a, b = await raw(store, 5), await raw(store, 6)
    a["seq"], b["seq"] = 6, 5
    a["hash"], b["hash"] = chain.digest(a), chain.digest(b)
    await store.put(chain.seq_key(5), b)
    await store.put(chain.seq_key(6), a)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("reordered", 5) and "prev_hash" in p.message


async def test_truncated_tail(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)  # checkpoints at 5 and 10
    for seq in (9, 10, 11, 12):
        await store.delete(chain.seq_key(seq))
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("truncated", 9) and "records 9 to 10 were deleted" in p.message


async def test_truncation_after_the_last_checkpoint_is_not_seen(store: Store, tmp_path: Path) -> None:
    """The limit of a chain: records after the last checkpoint can go unnoticed (docs/audit.md says so)."""
    log = await tampered(store, tmp_path)
    await store.delete(chain.seq_key(12))
    rep = await log.verify()
    assert rep.ok and rep.unsealed == 1


async def test_rewritten_chain_fails_the_checkpoint(store: Store, tmp_path: Path) -> None:
    """Someone rewrites records 3.. and recomputes every hash: the signed checkpoint at 5 no longer matches."""
    log = await tampered(store, tmp_path)
    prev = (await raw(store, 2))["hash"]
    for seq in range(3, 13):
        v = await raw(store, seq)
        if seq == 3:
            v["target"] = "vms/innocent"
        v["prev_hash"] = prev
        v["hash"] = prev = chain.digest(v)
        await store.put(chain.seq_key(seq), v)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_mismatch", 5) and "rewritten" in p.message


async def rewrite_from(store: Store, first: int) -> None:
    """What an attacker with the store does: change record ``first`` and recompute every hash after it."""
    last = len(await store.range(chain.PREFIX))
    prev = (await raw(store, first - 1))["hash"] if first > 1 else chain.GENESIS
    for seq in range(first, last + 1):
        v = await raw(store, seq)
        if seq == first:
            v["actor"] = {"name": "innocent", "role": "admin", "via": "session"}
        v["prev_hash"] = prev
        v["hash"] = prev = chain.digest(v)
        await store.put(chain.seq_key(seq), v)


async def test_rewrite_with_the_checkpoints_deleted_fails_the_anchors(store: Store, tmp_path: Path) -> None:
    """Record 3 changed, hashes 3..12 recomputed, every checkpoint deleted from the store: the anchor file
    outside the store still holds the signed checkpoints 5 and 10, which no longer match."""
    log = await tampered(store, tmp_path)
    await rewrite_from(store, 3)
    assert await store.delete_prefix(chain.CHECKPOINT_PREFIX) == 2
    rep = await log.verify()
    p = rep.problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_mismatch", 5), rep
    assert ANCHORS in p.message and "rewritten" in p.message


async def test_rewrite_with_checkpoints_and_anchors_deleted_misses_a_checkpoint(store: Store, tmp_path: Path) -> None:
    """The same with the anchor file gone too: a checkpoint is written at every multiple of the interval,
    so a log of 12 records without one at 5 is reported."""
    log = await tampered(store, tmp_path)
    await rewrite_from(store, 3)
    await store.delete_prefix(chain.CHECKPOINT_PREFIX)
    (tmp_path / ANCHORS).unlink(missing_ok=True)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_missing", 5) and "every 5 records" in p.message


async def test_a_checkpoint_deleted_from_the_store_is_missed(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    await store.delete(chain.checkpoint_key(10))
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_missing", 10), p


async def test_tail_deleted_with_its_checkpoint_fails_the_anchors(store: Store, tmp_path: Path) -> None:
    """Records 9..12 and the checkpoint at 10 deleted: the store alone looks like a log of 8 records
    sealed at 5, but the anchor file says the log reached 10."""
    log = await tampered(store, tmp_path)
    for seq in (9, 10, 11, 12):
        await store.delete(chain.seq_key(seq))
    await store.delete(chain.checkpoint_key(10))
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("truncated", 9), p
    assert "records 9 to 10 were deleted" in p.message and ANCHORS in p.message


async def test_rewrite_by_a_key_holder_fails_the_anchors(store: Store, tmp_path: Path) -> None:
    """An attacker with the store and the signing key rewrites the chain and re-signs every checkpoint in
    the store: the store is consistent, but the checkpoints anchored earlier are not theirs."""
    log = await tampered(store, tmp_path)
    await rewrite_from(store, 3)
    key = keys.load_or_create(tmp_path / "audit.key")
    for e in await store.range(chain.CHECKPOINT_PREFIX):
        cp = dict(e.value)
        cp["hash"] = (await raw(store, cp["seq"]))["hash"]
        every = [cp["every"]] if cp.get("every") is not None else []  # the interval it declares, signed too
        cp["signature"] = keys.sign(key, cp["seq"], cp["hash"], *every)
        await store.put(e.key, cp)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_mismatch", 5), p


async def test_forged_checkpoint(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    e = await store.get(chain.checkpoint_key(10))
    assert e is not None
    cp = dict(e.value)
    cp["hash"] = "ab" * 32
    await store.put(chain.checkpoint_key(10), cp)
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("bad_signature", 10)


async def test_checkpoint_signed_by_another_key(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    stranger = Ed25519PrivateKey.generate()
    h = (await raw(store, 12))["hash"]
    cp = chain.Checkpoint(seq=12, hash=h, time=chain.utc_now(), host="evil", key_id=keys.key_id(stranger.public_key()),
                          public_key=keys.public_b64(stranger.public_key()), signature=keys.sign(stranger, 12, h))  # fmt: skip
    await store.put(chain.checkpoint_key(12), cp.model_dump())
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("unknown_key", 12) and "evil" in p.message
    # Trusting that host's public key (a cluster with a key per host) makes it valid.
    (tmp_path / keys.TRUSTED_DIR).mkdir()
    pem = stranger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / keys.TRUSTED_DIR / "evil.pem").write_bytes(pem)
    assert (await log.verify()).ok


async def test_checkpoint_on_demand_and_time(store: Store, tmp_path: Path) -> None:
    log = make_log(store, tmp_path, every=1000)
    assert await log.checkpoint() is None
    await fill(log, 3)
    cp = await log.checkpoint()
    assert cp is not None and cp.seq == 3
    rep = await log.verify()
    assert rep.ok and rep.last_checkpoint == 3 and rep.unsealed == 0
    log.checkpoint_s = 0  # every M minutes: here at once
    await fill(log, 1)
    assert (await log.verify()).last_checkpoint == 4


async def test_head_found_after_restart(store: Store, tmp_path: Path) -> None:
    log = make_log(store, tmp_path)
    await fill(log, 7)  # the hint says 5; two more follow it
    again = make_log(store, tmp_path)
    await again.append("after-restart")
    assert (await again.verify()).ok and (await raw(store, 8))["action"] == "after-restart"


def test_key_file_is_private_and_made_once(tmp_path: Path) -> None:
    p = tmp_path / "k" / "audit.key"
    k1 = keys.load_or_create(p)
    k2 = keys.load_or_create(p)
    assert keys.key_id(k1.public_key()) == keys.key_id(k2.public_key())
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert "BEGIN PUBLIC KEY" in keys.public_pem(k1.public_key())


async def test_syslog_forwarding_and_failures(tmp_path: Path) -> None:
    from kasou.store.sqlite import SqliteStore

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    store = SqliteStore(tmp_path / "s.db")
    log = make_log(store, tmp_path, syslog=f"127.0.0.1:{rx.getsockname()[1]}")
    await log.append("login", target="users/bob", details={"password": "pw-secret-1"})
    line = rx.recv(65536).decode()
    rx.close()
    assert line.startswith("<") and " kasou " in line and '"action":"login"' in line and "pw-secret-1" not in line
    assert line.split(">", 1)[1].startswith("1 ")  # RFC 5424 version
    bad = make_log(store, tmp_path, syslog=str(tmp_path / "no-such-socket"))
    rec = await bad.append("x")  # the record is kept, the API goes on
    assert rec.seq == 2 and bad.syslog is not None and bad.syslog.failures == 1
    from kasou.control.events import Events

    active = await Events(store).active()
    assert [e.kind for e in active] == ["audit_syslog_failed"]
    await store.close()


# -- anchors outside the store ----------------------------------------------------------------


async def test_checkpoints_are_anchored_in_a_private_append_only_file(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)  # checkpoints at 5 and 10
    path = tmp_path / ANCHORS
    assert log.anchor_path == path and path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [5, 10]
    assert json.loads(lines[0])["hash"] == (await raw(store, 5))["hash"] and json.loads(lines[0])["every"] == 5
    cp = await log.checkpoint()  # `kasou audit checkpoint`
    assert cp is not None and cp.seq == 12 and len(path.read_text().splitlines()) == 3
    rep = await log.verify()
    assert rep.ok and (rep.anchors, rep.last_anchor, rep.anchor_file, rep.unsealed) == (3, 12, str(path), 0), rep
    # A line cut short by a crash is left out; a line that is no checkpoint is reported.
    with path.open("a") as f:
        f.write('{"seq": 13, "ha')
    assert (await log.verify()).ok
    with path.open("a") as f:
        f.write("\nnot json\n")
    p = (await log.verify()).problem
    assert p is not None and p.kind == "malformed" and "line 4 of the anchor file" in p.message


async def test_a_forged_anchor_is_refused(store: Store, tmp_path: Path) -> None:
    log = await tampered(store, tmp_path)
    path = tmp_path / ANCHORS
    first = json.loads(path.read_text().splitlines()[0])
    first["hash"] = "cd" * 32
    with path.open("a") as f:
        f.write(json.dumps(first) + "\n")
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("bad_signature", 5) and "line 3 of the anchor file" in p.message


async def test_checkpoints_go_to_syslog(tmp_path: Path) -> None:
    from kasou.store.sqlite import SqliteStore

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    store = SqliteStore(tmp_path / "s.db")
    log = make_log(store, tmp_path, every=2, syslog=f"127.0.0.1:{rx.getsockname()[1]}")
    await fill(log, 2)
    got = [rx.recv(65536).decode() for _ in range(3)]  # two records and the checkpoint at 2
    rx.close()
    cps = [x for x in got if " audit-checkpoint - " in x]
    assert len(cps) == 1 and '"seq":2' in cps[0] and '"signature":' in cps[0]
    await store.close()


async def test_a_checkpoint_that_failed_is_written_with_the_next_record(store: Store, tmp_path: Path) -> None:
    """The checkpoint at a multiple of the interval must exist: one whose write failed (or whose writer
    died right after the record) is written with the next record, so verify has no false alarm."""
    log = make_log(store, tmp_path)
    await fill(log, 4)
    create = store.create

    async def failing(key: str, value: dict) -> int:
        if key.startswith(chain.CHECKPOINT_PREFIX):
            raise chain.StoreError("the store is busy")
        return await create(key, value)

    store.create = failing  # type: ignore[method-assign]
    await fill(log, 1)
    store.create = create  # type: ignore[method-assign]
    assert log.stats["checkpoint_failures"] == 1
    p = (await log.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_missing", 5)
    await fill(log, 1)
    rep = await log.verify()
    assert rep.ok and rep.last_checkpoint == 5, rep


async def test_a_changed_interval_is_no_false_alarm(store: Store, tmp_path: Path) -> None:
    """KASOU_AUDIT_CHECKPOINT_EVERY changed between runs: each stretch of the log is held to the interval its
    writer declared (signed) in the checkpoint before it, whatever the verifier's own setting."""
    await fill(make_log(store, tmp_path, every=5), 7)  # checkpoint at 5 (every 5)
    await fill(make_log(store, tmp_path, every=3), 8)  # declares 3 at 8; then 9, 12, 15
    later = make_log(store, tmp_path, every=4)
    await fill(later, 3)  # declares 4 at 16; 18 is no multiple of 4
    rep = await later.verify()
    assert rep.ok, rep
    assert [int(e.key[len(chain.CHECKPOINT_PREFIX) :]) for e in await store.range(chain.CHECKPOINT_PREFIX)] == [
        5, 8, 9, 12, 15, 16]  # fmt: skip
    await store.delete(chain.checkpoint_key(12))
    (tmp_path / ANCHORS).unlink()
    p = (await later.verify()).problem
    assert p is not None and (p.kind, p.seq) == ("checkpoint_missing", 12) and "every 3 records" in p.message


async def test_an_anchor_that_cannot_be_written_is_an_event(tmp_path: Path) -> None:
    from kasou.control.events import Events
    from kasou.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    (tmp_path / "not-a-dir").write_text("")
    log = make_log(store, tmp_path, anchor_path=tmp_path / "not-a-dir" / ANCHORS)
    await fill(log, 5)  # the checkpoint at 5 is in the store, its anchor line is not
    assert log.stats["anchor_failures"] == 1 and log.stats["checkpoints"] == 1
    assert [e.kind for e in await Events(store).active()] == ["audit_anchor_failed"]
    log.anchor_path = tmp_path / ANCHORS  # the mount is back
    await fill(log, 5)
    assert [e.kind for e in await Events(store).active()] == []
    rep = await log.verify()
    assert rep.ok and rep.anchors == 1 and rep.last_anchor == 10, rep
    await store.close()
