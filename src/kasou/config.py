"""Where kasou keeps its files, and the settings read from the environment.

``KASOU_HOME`` selects the state directory (default ``/var/lib/kasou``) and
``KASOU_API`` the API address (default ``127.0.0.1:8470``), so several
independent environments can run side by side on one machine. Guest images are
immutable build products shared by every environment of the machine
(``KASOU_IMAGES``, default ``/var/lib/kasou/images``). ``KASOU_UPLINK`` names the
interface that carries the VM networks off the host (their VLANs tagged on it).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/kasou")
DEFAULT_IMAGES = Path("/var/lib/kasou/images")
DEFAULT_API = "127.0.0.1:8470"


def api_url(address: str | None = None) -> str:
    """Turn ``KASOU_API`` (``host:port`` or a full URL) into a base URL."""
    addr = address or os.environ.get("KASOU_API") or DEFAULT_API
    if "://" not in addr:
        # Without a scheme: plain HTTP on a loopback address (kasou up's default), HTTPS anywhere else.
        host = addr.split("/", 1)[0].rpartition(":")[0].strip("[]")
        addr = ("http://" if host in ("127.0.0.1", "::1", "localhost") else "https://") + addr
    return addr.rstrip("/")


def api_listen(address: str | None = None) -> tuple[str, int]:
    """The (host, port) the API server listens on, from the same setting."""
    url = api_url(address)
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 8470)


@dataclass(frozen=True)
class TlsFiles:
    """The trust anchor (the site CA, or the hospital's CA bundle) and this host's certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Paths:
    """Every path kasou uses on one host, derived from its home directory."""

    home: Path
    images: Path

    @classmethod
    def from_env(cls, home: str | Path | None = None) -> Paths:
        h = Path(home or os.environ.get("KASOU_HOME") or DEFAULT_HOME)
        images = Path(os.environ.get("KASOU_IMAGES") or DEFAULT_IMAGES)
        return cls(home=h.absolute(), images=images.absolute())

    @property
    def state_db(self) -> Path:
        return self.home / "state.db"

    @property
    def run(self) -> Path:
        """Runtime files of services and VMs (sockets, pid files)."""
        return self.home / "run"

    @property
    def vm_run(self) -> Path:
        """Per-VM runtime directories. Unix socket paths must fit in 107 bytes, so a
        deep home directory gets its VM sockets under /run/kasou/<hash of home>."""
        d = self.run / "vms"
        if len(str(d)) + 1 + 63 + len("/serial.sock") > 107:
            d = Path("/run/kasou") / hashlib.sha1(str(self.home).encode()).hexdigest()[:12] / "vms"
        return d

    @property
    def disks(self) -> Path:
        return self.home / "disks"

    @property
    def backups(self) -> Path:
        """The backup target directory (``KASOU_BACKUP_DIR``; in production a mount of another machine)."""
        env = os.environ.get("KASOU_BACKUP_DIR")
        return Path(env).absolute() if env else self.home / "backups"

    @property
    def logs(self) -> Path:
        return self.home / "log"

    @property
    def token_file(self) -> Path:
        """The API token (``KASOU_TOKEN_FILE``: one token shared by a cluster's hosts)."""
        env = os.environ.get("KASOU_TOKEN_FILE")
        return Path(env) if env else self.home / "api.token"

    @property
    def shared(self) -> Path | None:
        """Shared storage every host sees at the same path (``KASOU_SHARED_DIR``), if any."""
        env = os.environ.get("KASOU_SHARED_DIR")
        return Path(env).absolute() if env else None

    @property
    def agent_socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def tls_dir(self) -> Path:
        """This host's TLS files (``KASOU_TLS_DIR``, default ``HOME/tls``): ``ca.crt``, ``host.crt``, ``host.key``."""
        env = os.environ.get("KASOU_TLS_DIR")
        return Path(env).absolute() if env else self.home / "tls"

    def tls_files(self) -> TlsFiles:
        """The site CA to trust and this host's certificate and key (``KASOU_CA``, ``KASOU_TLS_CERT``,
        ``KASOU_TLS_KEY`` name the hospital's own files; each defaults to the file in :attr:`tls_dir`)."""
        d = self.tls_dir

        def pick(var: str, name: str) -> Path:
            env = os.environ.get(var, "").strip()
            return Path(env).absolute() if env else d / name

        return TlsFiles(
            ca=pick("KASOU_CA", "ca.crt"),
            cert=pick("KASOU_TLS_CERT", "host.crt"),
            key=pick("KASOU_TLS_KEY", "host.key"),
        )

    def pidfile(self, service: str) -> Path:
        return self.run / f"{service}.pid"

    def ensure(self) -> None:
        """Create the directories, private to root (they hold tokens and disks)."""
        for d in (self.home, self.run, self.vm_run, self.disks, self.logs):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)


def host_name() -> str:
    """This host's name in kasou (``KASOU_HOST_NAME`` or the system host name)."""
    return os.environ.get("KASOU_HOST_NAME") or socket.gethostname().split(".")[0]


def uplink() -> str | None:
    """``KASOU_UPLINK``: the interface that carries VM networks off this host (e.g. ``eth1``), if any."""
    return os.environ.get("KASOU_UPLINK", "").strip() or None


def etcd_endpoints() -> list[str]:
    """``KASOU_ETCD``: comma-separated etcd client URLs. Empty: the embedded SQLite store."""
    raw = os.environ.get("KASOU_ETCD", "")
    return [u.strip().rstrip("/") for u in raw.split(",") if u.strip()]


def etcd_metrics_endpoints(members: int) -> list[str | None]:
    """``KASOU_ETCD_METRICS``: each etcd member's metrics URL (its ``--listen-metrics-urls``), comma-separated
    in the order of ``KASOU_ETCD``; an empty entry for a member without one. The host guard asks them
    whether a member has a leader: they answer while a restarting member's client port does not."""
    raw = os.environ.get("KASOU_ETCD_METRICS", "").strip()
    urls: list[str | None] = [u.strip().rstrip("/") or None for u in raw.split(",")] if raw else []
    if len(urls) > members:
        raise ValueError(f"KASOU_ETCD_METRICS names {len(urls)} URLs for {members} etcd members")
    return urls + [None] * (members - len(urls))


def vcpu_ratio_setting() -> float:
    """``KASOU_VCPU_RATIO``: how many vCPUs a host may carry per CPU (default 4, as 4:1)."""
    raw = os.environ.get("KASOU_VCPU_RATIO", "").strip()
    try:
        value = float(raw) if raw else 4.0
    except ValueError:
        return 4.0
    return value if 0 < value <= 64 else 4.0


@dataclass(frozen=True)
class HaTimes:
    """The timeouts of high availability; docs/architecture.md explains the defaults.

    A host holds a lease of ``lease_ttl_s`` in etcd and renews it every ``renew_every_s``.
    Its guard kills its HA VMs once ``fence_after_s`` (TTL minus margin) pass without a
    renewal, so they are gone ``fence_margin_s`` before the lease can expire; the control
    plane restarts them elsewhere only ``fence_margin_s`` after it saw the lease expire.
    """

    lease_ttl_s: float = 6.0
    fence_margin_s: float = 2.0
    heartbeat_timeout_s: float = 30.0  # VM monitoring: a guest silent this long is reset

    @property
    def renew_every_s(self) -> float:
        return self.lease_ttl_s / 6

    @property
    def fence_after_s(self) -> float:
        return self.lease_ttl_s - self.fence_margin_s


def _float_env(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={raw} must be between {low:g} and {high:g}")
    return value


def ha_times() -> HaTimes:
    """``KASOU_HA_LEASE_TTL`` (s, default 6), ``KASOU_HA_FENCE_MARGIN`` (s, default 2),
    ``KASOU_HA_HEARTBEAT_TIMEOUT`` (s, default 30). The margin must leave at least two
    renewals before the fence: margin <= TTL / 2."""
    ttl = _float_env("KASOU_HA_LEASE_TTL", 6.0, 3.0, 300.0)
    margin = _float_env("KASOU_HA_FENCE_MARGIN", 2.0, 0.5, ttl / 2)
    hb = _float_env("KASOU_HA_HEARTBEAT_TIMEOUT", 30.0, 5.0, 3600.0)
    return HaTimes(ttl, margin, hb)


def backup_keep_default() -> int:
    """``KASOU_BACKUP_KEEP``: backup generations kept per VM unless its own setting says otherwise (default 7)."""
    raw = os.environ.get("KASOU_BACKUP_KEEP", "").strip()
    if not raw:
        return 7
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"KASOU_BACKUP_KEEP={raw!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise ValueError(f"KASOU_BACKUP_KEEP={raw} must be between 1 and 1000")
    return value


@dataclass(frozen=True)
class ConfineSettings:
    """How each VM's QEMU is confined (docs/security.md, "QEMU confinement").

    ``enabled``: QEMU runs as an unprivileged user of its own (``uid_base + slot``, numeric, no
    /etc/passwd entry), under a seccomp sandbox, in a cgroup of its own with the VM's memory
    limit (guest memory plus ``memory_overhead_mib``) and CPU and I/O weights.
    """

    enabled: bool = False
    uid_base: int = 64000
    slots: int = 1000
    memory_overhead_mib: int = 512


def confine_settings() -> ConfineSettings:
    """``KASOU_CONFINE`` (1/0, default 0), ``KASOU_VM_UID_BASE`` (default 64000) and
    ``KASOU_VM_UID_COUNT`` (default 1000): the uids kept for VMs; ``KASOU_QEMU_MEMORY_OVERHEAD_MIB``
    (default 512): what QEMU may use beyond the guest's memory before its cgroup's limit."""
    raw = os.environ.get("KASOU_CONFINE", "").strip().lower()
    if raw not in ("", "0", "1", "on", "off", "yes", "no", "true", "false"):
        raise ValueError(f"KASOU_CONFINE={raw!r} must be 1 or 0")
    enabled = raw in ("1", "on", "yes", "true")
    base = int(_float_env("KASOU_VM_UID_BASE", 64000, 1000, 2**31 - 100_000))
    count = int(_float_env("KASOU_VM_UID_COUNT", 1000, 1, 65536))
    overhead = int(_float_env("KASOU_QEMU_MEMORY_OVERHEAD_MIB", 512, 64, 65536))
    return ConfineSettings(enabled, base, count, overhead)
