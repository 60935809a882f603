from __future__ import annotations

from pathlib import Path

import pytest

from kasou.errors import StoreConflict
from kasou.store.sqlite import SqliteStore


async def test_revisions_and_cas(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    r1 = await s.create("vms/a", {"x": 1})
    with pytest.raises(StoreConflict):
        await s.create("vms/a", {"x": 2})
    r2 = await s.put("vms/a", {"x": 2}, expect_rev=r1)
    assert r2 > r1
    with pytest.raises(StoreConflict):
        await s.put("vms/a", {"x": 3}, expect_rev=r1)
    e = await s.get("vms/a")
    assert e is not None and e.value == {"x": 2} and e.mod_rev == r2
    await s.put("vms/b", {})
    await s.put("vmsx", {})
    assert [e.key for e in await s.range("vms/")] == ["vms/a", "vms/b"]
    with pytest.raises(StoreConflict):
        await s.delete("vms/a", expect_rev=r1)
    assert await s.delete("vms/a")
    assert not await s.delete("vms/a")
    assert await s.delete_prefix("vms/") == 1
    assert [e.key for e in await s.range("")] == ["vmsx"]
    await s.close()


async def test_survives_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    await s.put("k", {"v": "一"})
    await s.close()
    s2 = SqliteStore(tmp_path / "s.db")
    e = await s2.get("k")
    assert e is not None and e.value == {"v": "一"}
    await s2.close()
