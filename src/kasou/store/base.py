"""The store interface: keys, JSON values and etcd-style revisions for compare-and-swap."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict[str, Any]
    mod_rev: int  # the store revision of the last change to this key


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

    def local_dir(self) -> Path | None:
        """The directory a single-host store keeps its file in (the kasou home), where the site files
        (keys, the break-glass hash) go beside it (:func:`kasou.config.site_file`); None for a cluster store."""
        return None

    async def create(self, key: str, value: dict[str, Any]) -> int:
        """Write ``value`` only if ``key`` does not exist yet."""
        return await self.put(key, value, expect_rev=0)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
