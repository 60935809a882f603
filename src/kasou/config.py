"""Where kasou keeps its files, and the readers of its settings.

The settings themselves are one typed model (:mod:`kasou.settings`) read from the environment
(``KASOU_*``), then the file /etc/kasou/kasou.toml (or ``KASOU_CONFIG``), then the defaults;
docs/configuration.md lists every key. The functions here read through it and keep their names for
their callers. ``KASOU_HOME`` selects the state directory (default ``/var/lib/kasou``) and
``KASOU_API`` the API address (default ``127.0.0.1:8470``), so several
independent environments can run side by side on one machine. Guest images are
immutable build products shared by every environment of the machine
(``KASOU_IMAGES``, default ``/var/lib/kasou/images``). ``KASOU_UPLINK`` names the
interface that carries the VM networks off the host (their VLANs tagged on it).

A setting with a value kasou cannot use raises :class:`~kasou.errors.InvalidSetting`, whose
one-line message names the variable (or the file's key), the value and what is allowed, where that
setting is read; :func:`check_settings` checks them all at once (and refuses unknown names), so a
service refuses to start on a bad one.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou import settings
from kasou.errors import InvalidSetting
from kasou.settings.model import DEFAULT_API, DEFAULT_STORAGE_ROOTS, ROLE_NAMES, NotifySection, split_listen

DEFAULT_HOME = Path("/var/lib/kasou")
DEFAULT_IMAGES = Path("/var/lib/kasou/images")
__all__ = ["DEFAULT_API", "DEFAULT_STORAGE_ROOTS", "ROLE_NAMES"]  # the roles of kasou.model.users.Role


def setting(dotted: str) -> Any:
    """One setting's value now (``section.name``, e.g. ``ha.lease_ttl``), or its one-line error."""
    return settings.current().get(dotted)


def _opt_path(dotted: str) -> Path | None:
    value = setting(dotted)
    return Path(value) if value else None


def api_url(address: str | None = None) -> str:
    """Turn ``KASOU_API`` (``host:port`` or a full URL) into a base URL."""
    addr = address or setting("api.listen")
    if "://" not in addr:
        # Without a scheme: plain HTTP on a loopback address (kasou up's default), HTTPS anywhere else.
        host = addr.split("/", 1)[0].rpartition(":")[0].strip("[]")
        addr = ("http://" if host in ("127.0.0.1", "::1", "localhost") else "https://") + addr
    return addr.rstrip("/")


def api_listen(address: str | None = None) -> tuple[str, int]:
    """The (host, port) the API server listens on, from the same setting."""
    url = api_url(address)
    try:
        return split_listen(url)
    except ValueError:
        raise InvalidSetting(
            f"KASOU_API={address!r} is not allowed: the port must be a number from 1 to 65535 (e.g. 127.0.0.1:8470)",
            setting="KASOU_API",
        ) from None


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
        h = Path(home or setting("paths.home"))
        images = Path(setting("paths.images"))
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
        return _opt_path("backup.dir") or self.home / "backups"

    @property
    def transfer(self) -> Path:
        """Files in and out of kasou (``KASOU_TRANSFER_DIR``): disks and appliances to import, exported OVAs."""
        return _opt_path("paths.transfer_dir") or self.home / "transfer"

    @property
    def logs(self) -> Path:
        return self.home / "log"

    @property
    def token_file(self) -> Path:
        """The API token (``KASOU_TOKEN_FILE``: one token shared by a cluster's hosts)."""
        return _opt_path("api.token_file") or self.home / "api.token"

    @property
    def shared(self) -> Path | None:
        """Shared storage every host sees at the same path (``KASOU_SHARED_DIR``), if any."""
        return _opt_path("paths.shared_dir")

    @property
    def agent_socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def tls_dir(self) -> Path:
        """This host's TLS files (``KASOU_TLS_DIR``, default ``HOME/tls``): ``ca.crt``, ``host.crt``, ``host.key``."""
        return _opt_path("tls.dir") or self.home / "tls"

    @property
    def etcd_tls_dir(self) -> Path:
        """This host's etcd member's certificate and key (``kasou cluster init``/``join``), and the site's
        revocation list etcd reads (``crl.pem``, :mod:`kasou.control.revocation`)."""
        return self.tls_dir / "etcd"

    @property
    def etcd_crl(self) -> Path:
        """The site's certificate revocation list this host's etcd member reads at each new connection."""
        return self.etcd_tls_dir / "crl.pem"

    def tls_files(self) -> TlsFiles:
        """The site CA to trust and this host's certificate and key (``KASOU_CA``, ``KASOU_TLS_CERT``,
        ``KASOU_TLS_KEY`` name the hospital's own files; each defaults to the file in :attr:`tls_dir`)."""
        d = self.tls_dir

        return TlsFiles(
            ca=_opt_path("tls.ca") or d / "ca.crt",
            cert=_opt_path("tls.cert") or d / "host.crt",
            key=_opt_path("tls.key") or d / "host.key",
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
    key = settings.BY_ENV.get(env)
    value = setting(key.dotted) if key else os.environ.get(env, "").strip()
    if value:
        return Path(value).absolute()
    if beside is not None:
        return beside / name
    return elsewhere / name


def host_name() -> str:
    """This host's name in kasou (``KASOU_HOST_NAME`` or the system host name)."""
    return setting("host.name") or socket.gethostname().split(".")[0]


def ovmf_dir() -> Path:
    """Where the host's UEFI firmware images are (Debian's ``ovmf`` package): ``KASOU_OVMF_DIR``."""
    return Path(setting("paths.ovmf_dir"))


def novnc_dir() -> Path:
    """Where noVNC is served from (Debian's ``novnc`` package): ``KASOU_NOVNC_DIR``."""
    return Path(setting("paths.novnc_dir"))


def uplink() -> str | None:
    """``KASOU_UPLINK``: the interface that carries VM networks off this host (e.g. ``eth1``), if any."""
    value: str | None = setting("host.uplink")
    return value


def etcd_endpoints() -> list[str]:
    """``KASOU_ETCD``: comma-separated etcd client URLs. Empty: the embedded SQLite store."""
    return [u.rstrip("/") for u in setting("cluster.etcd")]


def etcd_metrics_endpoints(members: int) -> list[str | None]:
    """``KASOU_ETCD_METRICS``: each etcd member's metrics URL (its ``--listen-metrics-urls``), comma-separated
    in the order of ``KASOU_ETCD``; an empty entry for a member without one. The host guard asks them
    whether a member has a leader: they answer while a restarting member's client port does not."""
    found: list[str] = setting("cluster.etcd_metrics")
    urls: list[str | None] = [u.rstrip("/") or None for u in found]
    if len(urls) > members:
        raise InvalidSetting(
            f"KASOU_ETCD_METRICS={','.join(found)!r} names {len(urls)} URLs for {members} etcd members; "
            f"allowed: at most one per member of KASOU_ETCD, in its order",
            setting="KASOU_ETCD_METRICS",
        )
    return urls + [None] * (members - len(urls))


def vcpu_ratio_setting() -> float:
    """``KASOU_VCPU_RATIO``: how many vCPUs a host may carry per CPU (default 4, as 4:1; up to 64)."""
    return float(setting("host.vcpu_ratio"))


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
    """For a variable that is no key of the settings model (kasou's own are read with :func:`setting`): the
    number in the environment variable ``name`` (``default`` when unset or empty), which must lie
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
    loaded = settings.current()
    loaded.require("ha.lease_ttl", "ha.fence_margin", "ha.heartbeat_timeout")
    ha = loaded.settings.ha
    return HaTimes(ha.lease_ttl, ha.fence_margin, ha.heartbeat_timeout)


def ha_watchdog() -> Path | None:
    """``KASOU_HA_WATCHDOG``: the kernel's watchdog device the host guard feeds (e.g. /dev/watchdog), if any."""
    return _opt_path("ha.watchdog")


def vendor_max_priority() -> int:
    """``KASOU_VENDOR_MAX_PRIORITY``: the highest HA restart priority a vendor may give their VMs (0..100,
    default 50); an administrator may set any."""
    return int(setting("ha.vendor_max_priority"))


def backup_keep_setting() -> int | None:
    """``KASOU_BACKUP_KEEP``: backup generations kept per VM where no VM or department policy states a
    retention; unset (None): by the VM's criticality, 5 for 24h-clinical and 3 for the others
    (kasou.control.backup_policy)."""
    value: int | None = setting("backup.keep")
    return value


def storage_roots() -> list[str]:
    """``KASOU_STORAGE_ROOTS``: the directories storage pools may be made under (absolute paths separated
    by ``:`` or ``,``); default ``/srv``, ``/var/lib/kasou-pools``, ``/mnt``, ``/media``."""
    return [os.path.normpath(r) for r in setting("host.storage_roots")]


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
    m = settings.current().section("maintenance")
    return MaintenanceRetry(attempts=m.attempts, total_s=m.retry_s, backoff_s=m.backoff_s)


ACCEL_CHOICES = ("kvm", "tcg", "auto")


def accel_setting() -> str:
    """``KASOU_ACCEL``: ``kvm`` or ``tcg`` skip the KVM probe; ``auto`` (or unset) probes."""
    return str(setting("host.accel"))


def check_settings() -> None:
    """Check every setting at once: a bad value, an unknown ``KASOU_*`` variable or key of the file, a file
    that cannot be read raise :class:`InvalidSetting` (the first of them, one line) before a service starts
    (``kasou up``, ``kasou serve``, ``kasou agent``), never a traceback later on. ``kasou config check``
    prints them all."""
    problems = settings.current().problems()
    if problems:
        raise problems[0]
    api_listen()


def trusted_proxies() -> list[str]:
    """``KASOU_TRUSTED_PROXIES``: the addresses or networks (comma-separated, e.g. ``10.0.0.5,
    10.1.0.0/16``) of reverse proxies whose ``X-Forwarded-For`` is believed; none by default."""
    return list(setting("api.trusted_proxies"))


def session_idle_s() -> float:
    """``KASOU_SESSION_IDLE``: a session without a request for this long ends (default 15 minutes)."""
    return float(setting("session.idle"))


def session_max_s() -> float:
    """``KASOU_SESSION_MAX``: a session ends this long after sign-in whatever it does (default 12 hours)."""
    return float(setting("session.max"))


def console_idle_s() -> float:
    """``KASOU_CONSOLE_IDLE``: a console with no byte either way for this long is closed (default 15
    minutes, the session's idle log-off)."""
    return float(setting("session.console_idle"))


def audit_checkpoint_minutes() -> float:
    """``KASOU_AUDIT_CHECKPOINT_MINUTES``: a signed checkpoint at least this often (default 10)."""
    return float(setting("audit.checkpoint_minutes"))


def audit_checkpoint_every() -> int:
    """``KASOU_AUDIT_CHECKPOINT_EVERY``: a signed checkpoint every this many records (default 100)."""
    return int(setting("audit.checkpoint_every"))


SIGNIN_RATE_DEFAULT = 10.0


def signin_rate() -> float:
    """``KASOU_SIGNIN_RATE``: failed sign-ins a minute allowed from one source address (0: no bound)."""
    return float(setting("session.signin_rate"))


def require_totp_for_admins() -> bool:
    """``KASOU_REQUIRE_TOTP_FOR_ADMINS=1`` (kept working): the same as ``KASOU_REQUIRE_TOTP_FOR=admin``."""
    return "admin" in require_totp_for()


def require_totp_for() -> frozenset[str]:
    """``KASOU_REQUIRE_TOTP_FOR=admin,operator,vendor``: the roles that sign in only with a TOTP code (local and
    directory users alike); ``KASOU_REQUIRE_TOTP_FOR_ADMINS=1``, the older setting, adds ``admin``."""
    roles = set(setting("session.require_totp_for"))
    if setting("session.require_totp_for_admins"):
        roles.add("admin")
    return frozenset(roles)


def directory_recheck_s() -> float:
    """``KASOU_DIRECTORY_RECHECK``: a directory user's sessions and API tokens are checked against the directory
    again at most this often (seconds, default 300)."""
    return float(setting("session.directory_recheck"))


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
    c = settings.current().section("confine")
    return ConfineSettings(c.enabled, c.uid_base, c.uid_count, c.memory_overhead_mib)


def recordings_dir() -> Path:
    """Where this API server keeps the console recordings it made (``KASOU_RECORDING_DIR``, default
    ``KASOU_HOME/recordings``; mode 0700, each file 0600, sealed with the site's secrets key)."""
    return _opt_path("recording.dir") or Paths.from_env().home / "recordings"


def recording_days() -> int:
    """``KASOU_RECORDING_DAYS``: how long a console recording is kept (default 400 days: a full year, so the
    yearly internal audit and the monthly access-log reviews of the whole year can still replay a session,
    plus a month to hold that audit; 1..3650). Each deletion is a record in the audit chain."""
    return int(setting("recording.days"))


def audit_syslog() -> str:
    """``KASOU_AUDIT_SYSLOG``: where audit records are copied (``host:port`` over UDP, or a socket path); empty:
    nowhere."""
    return str(setting("audit.syslog") or "")


def notify_settings() -> NotifySection:
    """The ``[notify]`` section (``KASOU_NOTIFY_*``): where events are sent (webhook, mail, syslog) and from
    which severity on. A frozen object; its fields are in docs/configuration.md."""
    section: NotifySection = settings.current().section("notify")
    return section
