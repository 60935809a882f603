"""The data directory's rules: chunks written once, generations checked before they are kept, locks,
immutability, events; pruning, garbage collection and verification over it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kasou.errors import AlreadyExists, Forbidden, InvalidSpec, NotFound, TooLarge, WrongState
from kasou.vault import immutable, policy
from kasou.vault.index import MAX_BLOB, summary
from kasou.vault.store import Store
from tests.unit.vault.helpers import Clock, blob, fake_id, make_index, put_blobs

DAY = 86400.0


def test_a_chunk_is_written_once_and_never_replaced(store: Store) -> None:
    first = blob()
    cid = fake_id(first)
    assert store.put_chunk(cid, first) is True
    assert store.put_chunk(cid, blob()) is False
    digest, held = store.read_chunk(cid)
    assert held == first and digest == hashlib.sha256(first).digest()
    assert store.chunk_path(cid).read_bytes() == hashlib.sha256(first).digest() + first
    assert store.missing([cid, "0" * 64, cid]) == ["0" * 64]


def test_bad_chunks_are_refused(store: Store) -> None:
    with pytest.raises(InvalidSpec, match="KSC1"):
        store.put_chunk("a" * 64, b"plaintext")
    with pytest.raises(TooLarge):
        store.put_chunk("a" * 64, b"KSC1" + bytes(MAX_BLOB))
    for bad in ("A" * 64, "a" * 63, "../" + "a" * 61, "a" * 65):
        with pytest.raises(InvalidSpec):
            store.put_chunk(bad, blob())
    assert list(store.chunk_files()) == []


def test_a_generation_is_kept_with_the_policys_lock(store: Store, clock: Clock) -> None:
    ids = put_blobs(store, 3)
    state = policy.add_generation(store, make_index("emr-db", 1, [ids[0], None, ids[1]], ids[2]))
    assert state["received"] == clock.t and state["locked_until"] == clock.t + 30 * DAY
    assert store.generation_numbers("emr-db") == [1] and store.vms() == ["emr-db"]
    full = store.generation("emr-db", 1)
    assert full["disks"][0]["chunks"][1] is None and full["locked_until"] == state["locked_until"]
    assert summary(store.index("emr-db", 1))["disks"] == [{"disk_id": "root", "size": 3 * 4194304}]
    policy.set_policy(store, "emr-db", lock_days=90)
    state = policy.add_generation(store, make_index("emr-db", 2, [ids[0]], ids[2]))
    assert state["locked_until"] == clock.t + 90 * DAY
    added = [e for e in store.events() if e["event"] == "added"]
    assert [(e["vm"], e["generation"]) for e in added] == [("emr-db", 1), ("emr-db", 2)]


def test_once_a_key_is_allowed_generations_encrypted_to_another_are_refused(store: Store) -> None:
    ids = put_blobs(store, 2)
    policy.add_generation(store, make_index("emr-db", 1, [ids[0]], ids[1]))  # no key allowed yet: any key
    store.allow_key("0123456789abcdef")
    policy.add_generation(store, make_index("emr-db", 2, [ids[0]], ids[1]))
    with pytest.raises(Forbidden, match="does not accept"):  # an attacker's own key
        policy.add_generation(store, make_index("emr-db", 3, [ids[0]], ids[1], key_fingerprint="f" * 16))
    assert store.generation_numbers("emr-db") == [1, 2]
    with pytest.raises(InvalidSpec, match="not a backup key fingerprint"):
        store.allow_key("../x")
    store.disallow_key("0123456789abcdef")
    assert store.allowed_keys() == []


def test_a_generation_naming_a_chunk_not_held_is_refused(store: Store) -> None:
    ids = put_blobs(store, 1)
    with pytest.raises(InvalidSpec, match="does not hold") as e:
        policy.add_generation(store, make_index("emr-db", 1, [ids[0], "b" * 64], ids[0]))
    assert e.value.details["missing"] == ["b" * 64]
    with pytest.raises(InvalidSpec, match="does not hold"):  # the config chunk too
        policy.add_generation(store, make_index("emr-db", 1, [ids[0]], "c" * 64))
    assert store.generation_numbers("emr-db") == []
    assert not (store.root / "state" / "emr-db" / "000001.json").exists()
    assert [e["event"] for e in store.events()][-2:] == ["refused", "refused"]


def test_an_existing_generation_is_refused_and_unchanged(store: Store) -> None:
    ids = put_blobs(store, 2)
    policy.add_generation(store, make_index("emr-db", 1, [ids[0]], ids[1]))
    before = store.index_path("emr-db", 1).read_bytes()
    with pytest.raises(AlreadyExists):
        policy.add_generation(store, make_index("emr-db", 1, [ids[1]], ids[0]))
    assert store.index_path("emr-db", 1).read_bytes() == before
    assert store.events()[-1]["reason"] == "exists"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vm": "../etc"}, "vm"),
        ({"vm": "a" * 64}, "vm"),
        ({"generation": -1}, "generation"),
        ({"generation": True}, "generation"),
        ({"key_fingerprint": "xyz"}, "key_fingerprint"),
        ({"config": "not-an-id"}, "config"),
        ({"disks": [{"disk_id": "1root", "size": 0, "chunks": []}]}, "disk id"),
        ({"disks": [{"disk_id": "root/x", "size": 0, "chunks": []}]}, "disk id"),
        ({"disks": [{"disk_id": "root", "size": 4194305, "chunks": [None]}]}, "need 2 chunk entries"),
        ({"disks": [{"disk_id": "root", "size": 1, "chunks": ["Z" * 64]}]}, "chunk id"),
        ({"locked_until": 0}, "server's to set"),
        ({"bytes_sent": -5}, "bytes_sent"),
    ],
)
def test_names_and_ids_are_checked(store: Store, change: dict, message: str) -> None:
    ids = put_blobs(store, 1)
    with pytest.raises(InvalidSpec, match=message):
        policy.add_generation(store, make_index("emr-db", 1, [ids[0]], ids[0], **change))
    assert store.vms() == []


def test_a_new_generation_and_its_chunks_are_immutable(store: Store) -> None:
    if not store.immutable:
        pytest.skip("this file system does not keep the immutable flag")
    ids = put_blobs(store, 3)
    policy.add_generation(store, make_index("emr-db", 1, [ids[0]], ids[1]))
    for path in (store.index_path("emr-db", 1), store.chunk_path(ids[0]), store.chunk_path(ids[1])):
        assert immutable.is_immutable(path)
        with pytest.raises(PermissionError):
            os.unlink(path)
        with pytest.raises(PermissionError):
            path.write_bytes(b"garbage")
    assert not immutable.is_immutable(store.chunk_path(ids[2]))  # no generation refers to it


def test_the_probe_says_when_the_flag_does_not_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(immutable, "set_immutable", lambda _p, on=True: False)
    s = Store.create(tmp_path / "v", "site-b")
    assert s.info()["immutable"] is False
    ids = put_blobs(s, 1)
    policy.add_generation(s, make_index("vm1", 1, [], ids[0]))
    assert s.events()[-1]["immutable"] is False


def test_a_locked_generation_cannot_be_removed(store: Store, clock: Clock) -> None:
    ids = put_blobs(store, 1)
    policy.add_generation(store, make_index("emr-db", 1, [], ids[0]))
    with pytest.raises(WrongState, match="locked"):
        store.remove_generation("emr-db", 1)
    clock.advance(31 * DAY)
    store.remove_generation("emr-db", 1)
    assert store.generation_numbers("emr-db") == []
    with pytest.raises(NotFound):
        store.index("emr-db", 1)


def test_prune_then_gc(store: Store, clock: Clock) -> None:
    policy.set_policy(store, keep_daily=2, keep_weekly=0, keep_monthly=0, lock_days=4)
    per_gen = []
    for g in range(1, 6):  # one a day
        ids = put_blobs(store, 2)
        per_gen.append(ids)
        policy.add_generation(store, make_index("emr-db", g, [ids[0]], ids[1]))
        clock.advance(DAY)
    # now: gens 3-5 locked (4 days); 4 and 5 are the 2 newest days
    dry = policy.prune(store, dry_run=True)["emr-db"]
    assert {d.generation: d.keep for d in dry} == {5: True, 4: True, 3: True, 2: False, 1: False}
    assert store.generation_numbers("emr-db") == [1, 2, 3, 4, 5]
    policy.prune(store)
    assert store.generation_numbers("emr-db") == [3, 4, 5]
    assert [e["generation"] for e in store.events() if e["event"] == "pruned"] == [2, 1]
    young = put_blobs(store, 1)[0]  # uploaded for a generation not added yet
    r = policy.gc(store)  # the pruned generations' chunks are 4-5 days old
    assert r.removed == 4 and r.kept_young == 1
    for ids in per_gen[:2]:
        assert not store.has_chunk(ids[0]) and not store.has_chunk(ids[1])
    for ids in per_gen[2:]:
        assert store.has_chunk(ids[0])
    assert store.has_chunk(young)
    clock.advance(DAY + 1)
    assert policy.gc(store).removed == 1 and not store.has_chunk(young)


def test_verify_marks_sound_and_damaged_generations(store: Store, clock: Clock) -> None:
    ids = put_blobs(store, 3)
    policy.add_generation(store, make_index("emr-db", 1, [ids[0]], ids[1]))
    policy.add_generation(store, make_index("emr-db", 2, [ids[2]], ids[1]))
    res = policy.verify(store)
    assert [(r.generation, r.damaged) for r in res] == [(1, []), (2, [])]
    assert store.state("emr-db", 1)["verified_at"] == clock.t
    assert policy.verify(store) == []  # all verified once
    path = store.chunk_path(ids[2])
    immutable.set_immutable(path, False)  # a disk error on the backup server
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    clock.advance(10 * DAY)
    res = policy.verify(store, since_days=7)
    assert [(r.generation, r.damaged) for r in res] == [(1, []), (2, [ids[2]])]
    assert store.state("emr-db", 2)["damaged"] == [ids[2]]
    assert store.events()[-1]["event"] == "damaged"
    assert len(policy.verify(store, vm="emr-db", all_=True)) == 2


def test_tokens_are_kept_as_hashes(store: Store) -> None:
    token = store.add_client("hv1", "writer")
    assert token not in (store.root / "clients.json").read_text()
    c = store.authenticate(token)
    assert c is not None and (c.name, c.role) == ("hv1", "writer")
    assert store.authenticate(token + "x") is None
    with pytest.raises(AlreadyExists):
        store.add_client("hv1", "reader")
    with pytest.raises(InvalidSpec, match="role"):
        store.add_client("hv2", "admin")
    store.remove_client("hv1")
    assert store.authenticate(token) is None


def test_a_directory_that_is_not_a_data_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="backup-server init"):
        Store(tmp_path)
    (tmp_path / "x").write_text("")
    with pytest.raises(AlreadyExists, match="not empty"):
        Store.create(tmp_path, "site")
