"""Where kasou keeps its files, and the settings read from the environment.

``KASOU_HOME`` selects the state directory (default ``/var/lib/kasou``) and
``KASOU_API`` the API address (default ``127.0.0.1:8470``), so several
independent environments can run side by side on one machine. Guest images are
immutable build products shared by every environment of the machine
(``KASOU_IMAGES``, default ``/var/lib/kasou/images``). ``KASOU_UPLINK`` names the
interface that carries the VM networks off the host (their VLANs tagged on it).

A setting with a value kasou cannot use raises :class:`~kasou.errors.InvalidSetting`, whose
one-line message names the variable, the value and what is allowed; :func:`check_settings`
reads every number and choice at once, so a service refuses to start on a bad one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from kasou.errors import InvalidSetting

DEFAULT_HOME = Path("/var/lib/kasou")
DEFAULT_IMAGES = Path("/var/lib/kasou/images")
DEFAULT_API = "127.0.0.1:8470"
DEFAULT_STORAGE_ROOTS = ("/srv", "/var/lib/kasou-pools", "/mnt", "/media")


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
    host, sep, port = hostport.rpartition(":")
    if not sep or hostport.endswith("]"):  # no port given
        return hostport.strip("[]") or "127.0.0.1", 8470
    if not port:
        return host.strip("[]") or "127.0.0.1", 8470
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raw = address or os.environ.get("KASOU_API") or DEFAULT_API
        raise InvalidSetting(f"KASOU_API={raw!r}: the port must be a number from 1 to 65535 (e.g. 127.0.0.1:8470)")
    return host.strip("[]") or "127.0.0.1", int(port)


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
    def transfer(self) -> Path:
        """Files in and out of kasou (``KASOU_TRANSFER_DIR``): disks and appliances to import, exported OVAs."""
        env = os.environ.get("KASOU_TRANSFER_DIR")
        return Path(env).absolute() if env else self.home / "transfer"

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
        """Create the directories, private to root (they hold tokens and disks): :func:`private_dir_mode`."""
        for d in (self.home, self.run, self.vm_run, self.disks, self.logs):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, private_dir_mode())
        if self.vm_run.parent != self.run:  # /run/kasou/<hash>: which home it serves, for people and clean-ups
            (self.vm_run.parent / "home").write_text(f"{self.home}\n")


def site_file(name: str, env: str, beside: Path | None, elsewhere: Path) -> Path:
    """Where a site file (a key, the break-glass hash) is: the path in the environment variable ``env``,
    else ``name`` beside the SQLite store (``beside``: its directory, one host's kasou home; the store's
    ``local_dir()``), else ``name`` in ``elsewhere``."""
    value = os.environ.get(env, "").strip()
    if value:
        return Path(value).absolute()
    if beside is not None:
        return beside / name
    return elsewhere / name


def host_name() -> str:
    """This host's name in kasou (``KASOU_HOST_NAME`` or the system host name)."""
    return os.environ.get("KASOU_HOST_NAME") or socket.gethostname().split(".")[0]


def ovmf_dir() -> Path:
    """Where the host's UEFI firmware images are (Debian's ``ovmf`` package): ``KASOU_OVMF_DIR``."""
    return Path(os.environ.get("KASOU_OVMF_DIR", "").strip() or "/usr/share/OVMF")


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
        raise InvalidSetting(
            f"KASOU_ETCD_METRICS={raw!r} names {len(urls)} URLs for {members} etcd members; "
            f"allowed: at most one per member of KASOU_ETCD, in its order"
        )
    return urls + [None] * (members - len(urls))


def vcpu_ratio_setting() -> float:
    """``KASOU_VCPU_RATIO``: how many vCPUs a host may carry per CPU (default 4, as 4:1; up to 64)."""
    value = float_setting("KASOU_VCPU_RATIO", 4.0, 0.0, 64.0)
    if value <= 0:
        raise InvalidSetting(f"KASOU_VCPU_RATIO={value:g} is not allowed: a number above 0 and at most 64 (default 4)")
    return value


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


def float_setting(name: str, default: float, low: float, high: float) -> float:
    """The number in the environment variable ``name`` (``default`` when unset or empty), which must lie
    in ``[low, high]``; anything else raises :class:`InvalidSetting` naming the variable, the value
    and what is allowed."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidSetting(
            f"{name}={raw!r} is not allowed: a number from {low:g} to {high:g} (default {default:g})",
            setting=name,
        )
    return value


def int_setting(name: str, default: int, low: int, high: int) -> int:
    """Like :func:`float_setting` for a whole number."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidSetting(
            f"{name}={raw!r} is not allowed: a whole number from {low} to {high} (default {default})",
            setting=name,
        )
    return value


def choice_setting(name: str, choices: tuple[str, ...], default: str = "") -> str:
    """One of ``choices`` (case-insensitive) in the environment variable ``name``; unset or empty: ``default``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() not in choices:
        raise InvalidSetting(f"{name}={raw!r} is not allowed: one of {', '.join(choices)}", setting=name)
    return raw.lower()


def ha_times() -> HaTimes:
    """``KASOU_HA_LEASE_TTL`` (s, default 6), ``KASOU_HA_FENCE_MARGIN`` (s, default 2),
    ``KASOU_HA_HEARTBEAT_TIMEOUT`` (s, default 30). The margin must leave at least two
    renewals before the fence: margin <= TTL / 2."""
    ttl = float_setting("KASOU_HA_LEASE_TTL", 6.0, 3.0, 300.0)
    margin = float_setting("KASOU_HA_FENCE_MARGIN", 2.0, 0.5, ttl / 2)
    hb = float_setting("KASOU_HA_HEARTBEAT_TIMEOUT", 30.0, 5.0, 3600.0)
    return HaTimes(ttl, margin, hb)


def vendor_max_priority() -> int:
    """``KASOU_VENDOR_MAX_PRIORITY``: the highest HA restart priority a vendor may give their VMs (0..100,
    default 50); an administrator may set any."""
    return int_setting("KASOU_VENDOR_MAX_PRIORITY", 50, 0, 100)


def backup_keep_setting() -> int | None:
    """``KASOU_BACKUP_KEEP``: backup generations kept per VM where no VM or department policy states a
    retention; unset (None): by the VM's criticality, 5 for 24h-clinical and 3 for the others
    (kasou.control.backup_policy)."""
    if not os.environ.get("KASOU_BACKUP_KEEP", "").strip():
        return None
    return int_setting("KASOU_BACKUP_KEEP", 3, 1, 1000)


def storage_roots() -> list[str]:
    """``KASOU_STORAGE_ROOTS``: the directories storage pools may be made under (absolute paths separated
    by ``:`` or ``,``); default ``/srv``, ``/var/lib/kasou-pools``, ``/mnt``, ``/media``."""
    raw = os.environ.get("KASOU_STORAGE_ROOTS", "").strip()
    if not raw:
        return list(DEFAULT_STORAGE_ROOTS)
    roots = []
    for part in raw.replace(",", ":").split(":"):
        part = part.strip()
        if not part:
            continue
        if not part.startswith("/") or ".." in part.split("/") or "\n" in part:
            raise InvalidSetting(
                f"KASOU_STORAGE_ROOTS={raw!r} is not allowed: {part!r} is not an absolute directory path",
                setting="KASOU_STORAGE_ROOTS",
            )
        roots.append(os.path.normpath(part))
    if not roots:
        raise InvalidSetting(f"KASOU_STORAGE_ROOTS={raw!r} names no directory", setting="KASOU_STORAGE_ROOTS")
    return roots


@dataclass(frozen=True)
class MaintenanceRetry:
    """How a maintenance (emptying a host) retries a VM's move that failed: up to ``attempts`` moves per
    VM, waiting ``backoff_s`` before the second and twice as long before each next one (at most
    ``backoff_max_s``), and no new attempt once ``total_s`` have passed since the host began to empty."""

    attempts: int = 3
    total_s: float = 1800.0
    backoff_s: float = 10.0
    backoff_max_s: float = 120.0

    def backoff(self, failed_attempts: int) -> float:
        """The wait after the ``failed_attempts``-th failed move of one VM."""
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** max(0, failed_attempts - 1)))


def maintenance_retry() -> MaintenanceRetry:
    """``KASOU_MAINTENANCE_ATTEMPTS`` (moves per VM, default 3), ``KASOU_MAINTENANCE_RETRY_S`` (the bound
    on the whole, default 1800 s), ``KASOU_MAINTENANCE_BACKOFF_S`` (the first wait, default 10 s)."""
    return MaintenanceRetry(
        attempts=int_setting("KASOU_MAINTENANCE_ATTEMPTS", 3, 1, 20),
        total_s=float_setting("KASOU_MAINTENANCE_RETRY_S", 1800.0, 0.0, 86400.0),
        backoff_s=float_setting("KASOU_MAINTENANCE_BACKOFF_S", 10.0, 0.0, 600.0),
    )


ACCEL_CHOICES = ("kvm", "tcg", "auto")


def accel_setting() -> str:
    """``KASOU_ACCEL``: ``kvm`` or ``tcg`` skip the KVM probe; ``auto`` (or unset) probes."""
    return choice_setting("KASOU_ACCEL", ACCEL_CHOICES, "auto")


_BOOLEAN = ("1", "0", "yes", "no", "true", "false", "on", "off")


def check_settings() -> None:
    """Read every numeric and choice setting once: a bad one raises :class:`InvalidSetting` before a
    service starts (``kasou up``, ``kasou serve``, ``kasou agent``), never a traceback later on.

    The readers below are used where the value is needed, each with the same bounds."""
    api_listen()
    ha_times()
    vcpu_ratio_setting()
    backup_keep_setting()
    maintenance_retry()
    vendor_max_priority()
    storage_roots()
    confine_settings()
    accel_setting()
    etcd_metrics_endpoints(len(etcd_endpoints()))
    trusted_proxies()
    session_idle_s()
    session_max_s()
    console_idle_s()
    audit_checkpoint_minutes()
    audit_checkpoint_every()
    signin_rate()
    require_totp_for()
    directory_recheck_s()
    recording_days()


def trusted_proxies() -> list[str]:
    """``KASOU_TRUSTED_PROXIES``: the addresses or networks (comma-separated, e.g. ``10.0.0.5,
    10.1.0.0/16``) of reverse proxies whose ``X-Forwarded-For`` is believed; none by default."""
    raw = os.environ.get("KASOU_TRUSTED_PROXIES", "").strip()
    proxies = [p.strip() for p in raw.split(",") if p.strip()]
    for p in proxies:
        try:
            ipaddress.ip_network(p)
        except ValueError:
            raise InvalidSetting(
                f"KASOU_TRUSTED_PROXIES={raw!r} is not allowed: {p!r} is no IP address or network"
                " (e.g. 10.0.0.5, 10.1.0.0/16)",
                setting="KASOU_TRUSTED_PROXIES",
            ) from None
    return proxies


def session_idle_s() -> float:
    """``KASOU_SESSION_IDLE``: a session without a request for this long ends (default 15 minutes)."""
    return float_setting("KASOU_SESSION_IDLE", 900.0, 0.0, 10**9)


def session_max_s() -> float:
    """``KASOU_SESSION_MAX``: a session ends this long after sign-in whatever it does (default 12 hours)."""
    return float_setting("KASOU_SESSION_MAX", 12 * 3600.0, 0.0, 10**9)


def console_idle_s() -> float:
    """``KASOU_CONSOLE_IDLE``: a console with no byte either way for this long is closed (default 15
    minutes, the session's idle log-off)."""
    return float_setting("KASOU_CONSOLE_IDLE", 900.0, 0.0, 10**9)


def audit_checkpoint_minutes() -> float:
    """``KASOU_AUDIT_CHECKPOINT_MINUTES``: a signed checkpoint at least this often (default 10)."""
    return float_setting("KASOU_AUDIT_CHECKPOINT_MINUTES", 10.0, 0.0, 10**9)


def audit_checkpoint_every() -> int:
    """``KASOU_AUDIT_CHECKPOINT_EVERY``: a signed checkpoint every this many records (default 100)."""
    return int_setting("KASOU_AUDIT_CHECKPOINT_EVERY", 100, 1, 10**9)


SIGNIN_RATE_DEFAULT = 10.0


def signin_rate() -> float:
    """``KASOU_SIGNIN_RATE``: failed sign-ins a minute allowed from one source address (0: no bound)."""
    return float_setting("KASOU_SIGNIN_RATE", SIGNIN_RATE_DEFAULT, 0.0, 10**9)


def require_totp_for_admins() -> bool:
    """``KASOU_REQUIRE_TOTP_FOR_ADMINS=1`` (kept working): the same as ``KASOU_REQUIRE_TOTP_FOR=admin``."""
    return "admin" in require_totp_for()


#: The roles of :class:`kasou.model.users.Role` (config imports no model; tests/unit/test_settings.py checks
#: that the two lists agree).
ROLE_NAMES = ("admin", "operator", "vendor", "auditor", "clinician", "manager")


def require_totp_for() -> frozenset[str]:
    """``KASOU_REQUIRE_TOTP_FOR=admin,operator,vendor``: the roles that sign in only with a TOTP code (local and
    directory users alike); ``KASOU_REQUIRE_TOTP_FOR_ADMINS=1``, the older setting, adds ``admin``."""
    allowed = ROLE_NAMES
    raw = os.environ.get("KASOU_REQUIRE_TOTP_FOR", "").strip()
    roles = {r.strip().lower() for r in raw.split(",") if r.strip()}
    bad = sorted(roles - set(allowed))
    if bad:
        raise InvalidSetting(f"KASOU_REQUIRE_TOTP_FOR={raw!r} is not allowed: {', '.join(bad)} is no role; a comma "
                             f"list of {', '.join(allowed)}", setting="KASOU_REQUIRE_TOTP_FOR")  # fmt: skip
    if choice_setting("KASOU_REQUIRE_TOTP_FOR_ADMINS", _BOOLEAN) in ("1", "yes", "true", "on"):
        roles.add("admin")
    return frozenset(roles)


def directory_recheck_s() -> float:
    """``KASOU_DIRECTORY_RECHECK``: a directory user's sessions and API tokens are checked against the directory
    again at most this often (seconds, default 300)."""
    return float_setting("KASOU_DIRECTORY_RECHECK", 300.0, 5.0, 86400.0)


@dataclass(frozen=True)
class ConfineSettings:
    """How each VM's QEMU is confined (docs/security.md, "QEMU confinement").

    ``enabled``: QEMU runs as an unprivileged user of its own (``uid_base + slot``, numeric, no
    /etc/passwd entry), under a seccomp sandbox, in a cgroup of its own with the VM's memory
    limit (guest memory plus ``memory_overhead_mib``) and CPU and I/O weights.
    """

    enabled: bool = True
    uid_base: int = 64000
    slots: int = 1000
    memory_overhead_mib: int = 512


def private_dir_mode() -> int:
    """The mode of kasou's directories that hold disks, backups and runtime files: 0711 with QEMU
    confined (each VM's QEMU passes through them to its own files: search only, it can neither list
    nor read what is not its own, as libvirt's image directory), else 0700."""
    return 0o711 if confine_settings().enabled else 0o700


def confine_settings() -> ConfineSettings:
    """``KASOU_CONFINE`` (1/0, default 1), ``KASOU_VM_UID_BASE`` (default 64000) and
    ``KASOU_VM_UID_COUNT`` (default 1000): the uids kept for VMs; ``KASOU_QEMU_MEMORY_OVERHEAD_MIB``
    (default 512): what QEMU may use beyond the guest's memory before its cgroup's limit."""
    enabled = choice_setting("KASOU_CONFINE", _BOOLEAN, "1").lower() in ("1", "on", "yes", "true")
    base = int_setting("KASOU_VM_UID_BASE", 64000, 1000, 2**31 - 100_000)
    count = int_setting("KASOU_VM_UID_COUNT", 1000, 1, 65536)
    overhead = int_setting("KASOU_QEMU_MEMORY_OVERHEAD_MIB", 512, 64, 65536)
    return ConfineSettings(enabled, base, count, overhead)


def recordings_dir() -> Path:
    """Where this API server keeps the console recordings it made (``KASOU_RECORDING_DIR``, default
    ``KASOU_HOME/recordings``; mode 0700, each file 0600, sealed with the site's secrets key)."""
    env = os.environ.get("KASOU_RECORDING_DIR", "").strip()
    return Path(env) if env else Paths.from_env().home / "recordings"


def recording_days() -> int:
    """``KASOU_RECORDING_DAYS``: how long a console recording is kept (default 400 days: a full year, so the
    yearly internal audit and the monthly access-log reviews of the whole year can still replay a session,
    plus a month to hold that audit; 1..3650). Each deletion is a record in the audit chain."""
    return int_setting("KASOU_RECORDING_DAYS", 400, 1, 3650)
