"""The uptime ledger: every state transition of every VM, with its time and host."""

from __future__ import annotations

import time

from kasou.control.records import LedgerEntry, LedgerEvent, ledger_prefix
from kasou.store.base import Store


class Ledger:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._last_ns = 0

    async def record(
        self, vm: str, event: LedgerEvent, host: str | None, detail: str = "", from_host: str | None = None
    ) -> LedgerEntry:
        now_ns = max(time.time_ns(), self._last_ns + 1)  # strictly increasing keys keep the order exact
        self._last_ns = now_ns
        entry = LedgerEntry(time=now_ns / 1e9, event=event, host=host, detail=detail, from_host=from_host)
        await self.store.put(f"{ledger_prefix(vm)}{now_ns:020d}", entry.model_dump(mode="json"))
        return entry

    async def history(self, vm: str) -> list[LedgerEntry]:
        return [LedgerEntry.model_validate(e.value) for e in await self.store.range(ledger_prefix(vm))]

    async def forget(self, vm: str) -> None:
        await self.store.delete_prefix(ledger_prefix(vm))
