"""The store interface: keys, JSON values and etcd-style revisions for compare-and-swap, and watches."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict[str, Any]
    mod_rev: int  # the store revision of the last change to this key


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a :class:`Watch`.

    ``put``: ``key`` now holds ``value`` (written at ``revision``); ``delete``: ``key`` was deleted at
    ``revision`` (``value`` None). ``resync``: changes may have been missed (etcd compacted the history
    the watch had to resume from; the SQLite store's change log was trimmed past a watcher that fell far
    behind): whoever keeps a view of the prefix reads it again with :meth:`Store.range` (``key`` is "",
    ``value`` None, ``revision`` where the watch goes on from; changes from there may come again).
    """

    kind: Literal["put", "delete", "resync"]
    key: str
    value: dict[str, Any] | None
    revision: int


class Watch(abc.ABC):
    """The changes under one prefix, in revision order, from the moment it is started::

        async with store.watch("vms/") as changes:
            snapshot = await store.range("vms/")  # started first: nothing between the two is missed
            async for event in changes:
                ...

    Leaving the ``async with`` (also by cancellation) ends it and releases what it holds (a
    connection, a registration); iterating a closed watch ends the iteration. A store that can no
    longer follow the changes (every etcd member gone) raises StoreError from the iteration.
    """

    async def __aenter__(self) -> Watch:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self.next()
        if event is None:
            raise StopAsyncIteration
        return event

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin watching: every change committed after this returns is delivered."""

    @abc.abstractmethod
    async def next(self) -> WatchEvent | None:
        """The next change (waiting for it as long as it takes); None once the watch is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching; idempotent."""


class Store(abc.ABC):
    """A transactional key-value store. Values are JSON objects.

    ``expect_rev`` makes a write conditional, as an etcd transaction would:
    ``0`` means "the key must not exist", a positive number "the key must
    still be at this revision"; a failed condition raises StoreConflict.
    """

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def range(self, prefix: str) -> list[Entry]:
        """All entries whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    async def put(self, key: str, value: dict[str, Any], expect_rev: int | None = None) -> int:
        """Write ``value``; return the new revision."""

    @abc.abstractmethod
    async def delete(self, key: str, expect_rev: int | None = None) -> bool:
        """Delete ``key``; False if it did not exist."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int: ...

    @abc.abstractmethod
    def watch(self, prefix: str) -> Watch:
        """The changes to keys starting with ``prefix`` from now on (see :class:`Watch`); nothing is
        started until the watch is (``async with``)."""

    def local_dir(self) -> Path | None:
        """The directory a single-host store keeps its file in (the kasou home), where the site files
        (keys, the break-glass hash) go beside it (:func:`kasou.config.site_file`); None for a cluster store."""
        return None

    async def create(self, key: str, value: dict[str, Any]) -> int:
        """Write ``value`` only if ``key`` does not exist yet."""
        return await self.put(key, value, expect_rev=0)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
