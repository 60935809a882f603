"""The uptime ledger: every state transition of every VM, with its time and host.

Entries are kept under the VM's name and carry its uuid: the history of a name is the history of the VM
that holds it now, never of an earlier, deleted VM of that name.
"""

from __future__ import annotations

import time

from kasou.control.records import LedgerEntry, LedgerEvent, VMRecord, ledger_prefix, vm_key
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
        e = await self.store.get(vm_key(vm))
        uuid = VMRecord.model_validate(e.value).uuid if e is not None else None
        entry = LedgerEntry(time=now_ns / 1e9, event=event, host=host, detail=detail, from_host=from_host, uuid=uuid)
        await self.store.put(f"{ledger_prefix(vm)}{now_ns:020d}", entry.model_dump(mode="json"))
        return entry

    async def history(self, vm: str, of: VMRecord | None = None) -> list[LedgerEntry]:
        """The entries under ``vm``; with ``of``, only that VM's (an entry made before kasou kept uuids
        counts as its own if it is not older than the VM)."""
        entries = [LedgerEntry.model_validate(e.value) for e in await self.store.range(ledger_prefix(vm))]
        if of is None:
            return entries
        return [e for e in entries if e.uuid == of.uuid or (e.uuid is None and e.time >= of.created_at)]

    async def forget(self, vm: str) -> None:
        await self.store.delete_prefix(ledger_prefix(vm))
