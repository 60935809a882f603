"""The state store: one key-value interface with revisions, as etcd offers it.

A single host uses the embedded SQLite store; a cluster uses etcd. The
control plane only ever sees :class:`Store`.
"""

from kasou.store.base import Entry, Store, Watch, WatchEvent
from kasou.store.sqlite import SqliteStore

__all__ = ["Entry", "SqliteStore", "Store", "Watch", "WatchEvent"]
