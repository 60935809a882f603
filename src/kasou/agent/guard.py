"""The host guard: this host's cluster lease, and self-fencing when the lease cannot be renewed.

A host is alive for the cluster while its record ``hosts/<name>`` exists in etcd,
attached to a lease the guard renews every ``renew_every_s``. When the guard
cannot renew for ``fence_after_s`` (the TTL minus the fence margin), it kills
every HA-protected QEMU of the host with SIGKILL, and keeps killing any that
appear until it holds a lease again. The lease cannot expire before
``fence_after_s + fence_margin_s`` after the last renewal *sent*, and the control
plane restarts the VMs only ``fence_margin_s`` after it saw the lease expire: so
the copy here is dead at least two margins before another one starts.

The guard is its own small process (``kasou agent guard``), not a task of the
agent, so an agent restart (an upgrade) never touches the lease nor the VMs. The
agent starts it when it is not running (one per host, by a lock file) and tells
it which VMs are HA-protected through marker files (``<run>/ha/<vm>``). The
deadline check runs in a thread of its own, so a slow etcd call cannot delay
the fence.

Quorum loss is not isolation: when no etcd member can have a leader (every
member either answers "no leader" or refuses connections, so fewer than a quorum
are unaccounted for), no lease can expire and nobody can restart anything, so
the guard holds its fence: losing quorum stops changes, not VMs. Each member is
asked on its metrics listener (``KASOU_ETCD_METRICS``, or kasou's port for a member
learnt later: ``member_metrics``; ``etcd_server_has_leader``)
when it has one: a member restarting after quorum loss accepts connections on
its client port but answers nothing there until it has joined a working
cluster (etcd serves clients only once ready), so asked there, two members
restarted together count as unknown and the proof fails until a leader is
elected, while their metrics listeners say "no leader" from the start. A probe that
proves it counts as a renewal sent when the probe was: a leader elected after it
extends every lease by its TTL (etcd's lessor ``Promote``; this assumes lease
checkpointing is off, etcd 3.4's default), so the guard again has TTL minus
margin to renew before it fences.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from kasou.config import HaTimes, Paths, ha_watchdog
from kasou.errors import KasouError
from kasou.hypervisor.qemu import process
from kasou.model.cluster import REVOKED_PREFIX, metrics_url, revoked_serial
from kasou.peers import Revoked, registry_names, revoked_cache
from kasou.store.base import Entry
from kasou.store.etcd import EtcdStore

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.1  # how often the fence thread looks at the deadline
PROBE_TIMEOUT_S = 0.7
RETRY_AFTER_FAILURE_S = 0.2  # how soon a failed renewal is tried again


def host_key(name: str) -> str:
    return f"hosts/{name}"


class Protected:
    """The HA-protected VMs of this host, from the QEMU driver's run directories.

    The driver writes each VM's launch spec (``launch.json``, with ``ha``) before its
    QEMU starts, and QEMU its pid file; a pid counts only if it is that VM's QEMU.
    """

    def __init__(self, paths: Paths) -> None:
        self.vm_run = paths.vm_run

    def names(self) -> list[str]:
        out = []
        try:
            dirs = sorted(self.vm_run.iterdir())
        except FileNotFoundError:
            return []
        for d in dirs:
            try:
                spec = json.loads((d / "launch.json").read_text()).get("spec") or {}
            except (OSError, ValueError):
                continue
            if spec.get("ha"):
                out.append(d.name)
        return out

    def pid(self, name: str) -> int | None:
        try:
            return int((self.vm_run / name / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> dict[str, int]:
        out = {}
        for name in self.names():
            pid = self.pid(name)
            if pid is not None and process.is_guest(pid, name):
                out[name] = pid
        return out

    def kill_all(self, reason: str) -> list[str]:
        """SIGKILL every running HA QEMU here; note why beside each. Returns the VMs killed."""
        killed = []
        for name, pid in self.running().items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(name)
            with contextlib.suppress(OSError):
                note = {"time": time.time(), "reason": reason}
                (self.vm_run / name / "fenced.json").write_text(json.dumps(note))
        deadline = time.monotonic() + 2.0
        for name in killed:
            gone = self.pid(name)
            while gone is not None and process.alive(gone) and time.monotonic() < deadline:
                time.sleep(0.01)
        return killed


class HostGuard:
    """Keeps ``hosts/<host>`` alive in etcd and fences this host's HA VMs when it cannot."""

    def __init__(
        self,
        store: EtcdStore,
        host: str,
        paths: Paths,
        times: HaTimes,
        record: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        metrics: list[str | None] | None = None,
    ) -> None:
        self.store = store
        # Each configured member's metrics URL, in the order of the endpoints the store starts with; the members
        # the store learns later get theirs from ``member_metrics``.
        given = list(metrics or [])
        self.metrics = {e: given[i] if i < len(given) else None for i, e in enumerate(store.endpoints)}
        self.host = host
        self.paths = paths
        self.times = times
        self.record = record
        self.clock = clock
        self.protected = Protected(paths)
        self.lease: int | None = None
        self._lock = threading.Lock()
        self._deadline: float | None = None  # fence after this (monotonic); None: no lease held
        self._stop = threading.Event()
        self.fences = 0
        self.watchdog: Watchdog | None = None
        self._published: dict[str, Any] | None = None
        self.renewed = True  # the last renewal succeeded

    # -- the fence thread ---------------------------------------------------------------------

    def _should_fence(self, now: float) -> bool:
        with self._lock:
            return self._deadline is None or now > self._deadline

    def check(self) -> list[str]:
        """One look at the deadline: fence if it has passed. The thread calls this every 0.1 s."""
        if not self._should_fence(self.clock()):
            return []
        killed = self.protected.kill_all(f"host {self.host} could not renew its cluster lease")
        if killed:
            self.fences += 1
            log.error("host %s: lease not renewed in time; fenced %s", self.host, ", ".join(killed))
        return killed

    def _fence_loop(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                self.check()
                if self.watchdog is not None:
                    self.watchdog.feed()
            except Exception:  # the fence must outlive any surprise
                log.exception("fence check failed")

    # -- renewal ----------------------------------------------------------------------------------

    def _arm(self, sent_at: float) -> None:
        with self._lock:
            deadline = sent_at + self.times.fence_after_s
            self._deadline = deadline if self._deadline is None else max(self._deadline, deadline)

    def _disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _state_file(self) -> Path:
        return self.paths.run / "guard.json"

    def _save_lease(self) -> None:
        self._state_file().write_text(json.dumps({"lease": self.lease, "host": self.host}))

    def _load_lease(self) -> int | None:
        try:
            data = json.loads(self._state_file().read_text())
            return int(data["lease"]) if data.get("host") == self.host else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _register(self) -> None:
        # A new lease means the old one expired: whatever ran under it may run elsewhere now.
        self._disarm()
        killed = await asyncio.to_thread(self.protected.kill_all, "its host's cluster lease had expired")
        if killed:
            log.error("host %s: lease had expired; fenced %s before rejoining", self.host, ", ".join(killed))
        sent = self.clock()
        self.lease = await self.store.grant_lease(self.times.lease_ttl_s)
        self._save_lease()
        await self._publish(self.record())
        self._arm(sent)
        log.info("host %s registered (lease %x, ttl %g s)", self.host, self.lease or 0, self.times.lease_ttl_s)

    async def _publish(self, record: dict[str, Any]) -> None:
        value = {**record, "name": self.host, "registered_at": time.time(), "lease": self.lease}
        await self.store.put(host_key(self.host), value, lease=self.lease)
        self._published = record

    async def renew_once(self) -> None:
        """Renew the lease (or get one). On failure, decide whether the fence may wait."""
        sent = self.clock()
        probe: asyncio.Task[bool] | None = None
        try:
            if self.lease is None:
                await self._register()
                return
            if not self.renewed:
                # Renewals are failing: ask whether etcd lost its quorum at the same time, not after
                # the keepalive timed out, so each round costs one timeout rather than two.
                probe = asyncio.create_task(self._prove_no_quorum(sent))
            await self.store.keepalive(self.lease)
            self._arm(sent)
            self.renewed = True
            current = self.record()
            if current != self._published:  # the agent's address or offer changed
                await self._publish(current)
        except KasouError as e:
            if e.details.get("lease") is not None:
                if await self._key_still_on_lease():
                    # etcd deletes a lease's keys as it revokes it: a member that said "expired"
                    # while our key is still attached to the lease lags behind. Renew again.
                    log.warning("host %s: %s, but its key is still attached to it; renewing again",
                                self.host, e.message)  # fmt: skip
                    self.renewed = False
                    return
                log.error("host %s: %s", self.host, e.message)  # the lease is gone for good: fence, rejoin
                self.lease = None
                self._disarm()  # the fence thread kills the HA VMs at once
                return
            self.renewed = False
            log.warning("host %s: lease renewal failed: %s", self.host, e.message)
            if probe is None:
                probe = asyncio.create_task(self._prove_no_quorum(self.clock()))
            await probe
        finally:
            if probe is not None and not probe.done():
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe

    async def _prove_no_quorum(self, sent: float) -> bool:
        """Probe etcd's members; if no leader could exist when the probe was ``sent``, arm from then.

        Any leader comes later, and a new leader extends every lease by its TTL: the proof counts
        as a renewal sent when the probe was. Armed at once, not after the keepalive gives up."""
        if await self.quorum_lost_everywhere():
            self._arm(sent)
            return True
        return False

    async def _key_still_on_lease(self) -> bool:
        """True if a linearizable read shows this host's key still attached to our lease."""
        try:
            e = await self.store.get(host_key(self.host))
        except Exception:  # cannot tell: the lease may be gone
            return False
        return e is not None and e.value.get("lease") == self.lease

    async def quorum_lost_everywhere(self) -> bool:
        """True only if fewer than a quorum of etcd members could be part of a working cluster."""
        metrics = member_metrics(self.store.endpoints, self.metrics)
        tls = self.store.tls
        probes = (probe_member(e, m, tls) for e, m in zip(self.store.endpoints, metrics, strict=True))
        results = await asyncio.gather(*probes)
        unknown = sum(1 for r in results if r == "unknown")
        quorum = len(results) // 2 + 1
        if unknown < quorum:
            log.warning("host %s: etcd has no quorum (%s); holding the fence", self.host, ", ".join(results))
            return True
        return False

    async def run(self) -> None:
        """Renew until cancelled; the fence thread runs beside."""
        # A restarted guard goes on with its lease if it still lives. Until a renewal succeeds
        # there is no deadline, so the fence thread (started after this first try) fences at once.
        self.lease = self._load_lease()
        await self.renew_once()
        thread = threading.Thread(target=self._fence_loop, name="fence", daemon=True)
        thread.start()
        try:
            while True:
                await self.renew_once()
                # After a failure, try again soon: once etcd has a leader again, every lease has
                # TTL from then on, and the fence waits for no one.
                await asyncio.sleep(self.times.renew_every_s if self.renewed else RETRY_AFTER_FAILURE_S)
        finally:
            self._stop.set()


def member_metrics(endpoints: list[str], configured: dict[str, str | None]) -> list[str | None]:
    """Each endpoint's metrics URL: the one the settings give (``KASOU_ETCD_METRICS``); for a member the store
    learnt from the member list, kasou's own (port 2381 on its client URL's host, as ``kasou cluster`` starts
    every member) when the settings' URLs all follow that rule, else none (the client port then decides).

    So the first host of a cluster, whose settings name only its own member, proves a quorum loss with every
    member's metrics listener like the hosts that joined later."""
    given = [(e, m) for e, m in configured.items() if m]
    kasou_made = bool(given) and all(m.rstrip("/") == metrics_url(e) for e, m in given)
    out: list[str | None] = []
    for e in endpoints:
        if e in configured:
            out.append(configured[e])
        else:
            out.append(metrics_url(e) if kasou_made else None)
    return out


async def probe_member(endpoint: str, metrics: str | None = None, tls: ssl.SSLContext | None = None) -> str:
    """``no-leader`` (it answers and has none), ``dead`` (connection refused), or ``unknown``.

    With the member's metrics URL, its ``etcd_server_has_leader`` gauge is asked first. A refused
    metrics port proves nothing (etcd opens it after its raft node starts): the client port decides.
    """
    if metrics:
        verdict = await _probe_metrics(metrics, tls)
        if verdict != "refused":
            return verdict
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, verify=tls if tls is not None else True) as c:
            r = await c.post(f"{endpoint.rstrip('/')}/v3/maintenance/status", json={})
        data = r.json()
    except httpx.ConnectError as e:
        return "dead" if _refused(e) else "unknown"
    except (httpx.HTTPError, ValueError):
        return "unknown"
    if not isinstance(data, dict):
        return "unknown"
    if "error" in data or str(data.get("leader", "0")) in ("0", ""):
        return "no-leader"
    return "unknown"


async def _probe_metrics(url: str, tls: ssl.SSLContext | None) -> str:
    """``no-leader``, ``unknown`` (it has a leader, or no clear answer) or ``refused``."""
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, verify=tls if tls is not None else True) as c:
            r = await c.get(f"{url.rstrip('/')}/metrics")
    except httpx.ConnectError as e:
        return "refused" if _refused(e) else "unknown"
    except httpx.HTTPError:
        return "unknown"
    if r.status_code != 200:
        return "unknown"
    for line in r.text.splitlines():
        if line.startswith("etcd_server_has_leader "):
            return "no-leader" if line.split()[1] in ("0", "0.0") else "unknown"
    return "unknown"


def _refused(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError) or getattr(seen, "errno", None) == errno.ECONNREFUSED:
            return True
        if "Connection refused" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Watchdog:
    """The kernel's watchdog device (``KASOU_HA_WATCHDOG``, e.g. /dev/watchdog with softdog), fed by the guard.

    It closes the one gap self-fencing has: the guard *and* the agent dead while QEMUs run. If the
    guard stops feeding, the kernel reboots the host after ``timeout_s`` (set to TTL minus margin),
    before the lease can expire, as Proxmox's watchdog-mux does.
    """

    WDIOC_SETTIMEOUT = 0xC0045706

    def __init__(self, device: str, timeout_s: float) -> None:
        self.fd = os.open(device, os.O_WRONLY)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, self.WDIOC_SETTIMEOUT, int(max(1, timeout_s)).to_bytes(4, "little"))

    def feed(self) -> None:
        os.write(self.fd, b"\0")


# -- one guard per host ------------------------------------------------------------------------------


def record_file(paths: Paths) -> Path:
    return paths.run / "guard-record.json"


def lock_file(paths: Paths) -> Path:
    return paths.run / "guard.lock"


def guard_running(paths: Paths) -> bool:
    """True if a guard holds this host's lock."""
    try:
        fd = os.open(lock_file(paths), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def run_guard(
    paths: Paths,
    host: str,
    endpoints: list[str],
    times: HaTimes,
    metrics: list[str | None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """The guard process: hold the host's lock, then renew and fence until killed."""
    paths.ensure()
    fd = os.open(lock_file(paths), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"a guard already runs for {paths.home}") from None
    with contextlib.suppress(OSError):
        os.nice(-10)  # the lease must be renewed even on a host whose CPUs are saturated

    def record() -> dict[str, Any]:
        try:
            return dict(json.loads(record_file(paths).read_text()))
        except (OSError, ValueError):
            return {}

    async def main() -> None:
        store = EtcdStore(endpoints, timeout=times.renew_every_s, tls=tls)
        guard = HostGuard(store, host, paths, times, record, metrics=metrics)
        device = str(ha_watchdog() or "")  # KASOU_HA_WATCHDOG
        if device:
            guard.watchdog = Watchdog(device, times.fence_after_s)
            log.info("feeding the watchdog %s (timeout %g s)", device, times.fence_after_s)
        try:
            await guard.run()
        finally:
            await store.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


REGISTRY_FRESH_S = 5.0


async def read_prefix(endpoints: list[str], tls: ssl.SSLContext | None, prefix: str) -> list[Entry]:
    """One read of ``prefix`` in etcd, on a connection of its own (the agent keeps no store open)."""
    store = EtcdStore(endpoints, timeout=3.0, tls=tls)
    try:
        return await store.range(prefix)
    finally:
        await store.close()


def host_registry(
    endpoints: list[str], tls: ssl.SSLContext | None = None, fresh_s: float = REGISTRY_FRESH_S
) -> Callable[[], Awaitable[list[str]]]:
    """The names and agent addresses of the hosts registered in etcd (``hosts/<name>``), read at most every
    ``fresh_s`` seconds: whom an agent answers when a peer's certificate lacks kasou's host marker
    (a hospital's own certificates, :mod:`kasou.peers`). When etcd does not answer, the last list read."""
    cache: dict[str, Any] = {"at": -fresh_s, "names": []}

    async def names() -> list[str]:
        if time.monotonic() - cache["at"] < fresh_s:
            return list(cache["names"])
        try:
            entries = await read_prefix(endpoints, tls, "hosts/")
            cache["names"] = registry_names((e.key.split("/", 1)[1], e.value) for e in entries)
            cache["at"] = time.monotonic()
        except KasouError as e:
            log.warning("cannot read the host registry (%s); using the last one read", e)
        return list(cache["names"])

    return names


def revoked_registry(endpoints: list[str], tls: ssl.SSLContext | None = None) -> Revoked:
    """The serial numbers of the certificates revoked in etcd (``cluster/revoked/<serial>``, written by
    ``kasou cluster leave`` and ``remove``): peers an agent refuses (:mod:`kasou.peers`)."""

    async def read() -> set[int]:
        return {revoked_serial(e.key) for e in await read_prefix(endpoints, tls, REVOKED_PREFIX)}

    return revoked_cache(read)
