"""kasou's settings as one typed model: a section per topic, each key with its environment variable.

Every field is declared with :func:`number`, :func:`choice`, :func:`path` ... which record, beside the
pydantic type and bounds, the key's ``KASOU_*`` name and a sentence of what is allowed. That sentence is what a
bad value's one-line error says, and docs/configuration.md is made from the same records
(:data:`KEYS`), so the documentation, the errors and the checks cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kasou.settings.sources import EnvSource, TomlSource

DEFAULT_API = "127.0.0.1:8470"
DEFAULT_STORAGE_ROOTS = ("/srv", "/var/lib/kasou-pools", "/mnt", "/media")
ROLE_NAMES = ("admin", "operator", "vendor", "auditor", "clinician", "manager")
SEVERITIES = ("info", "warning", "error", "critical")


def _meta(env: str, allowed: str, kind: str, doc: str, shown: str | None, secret: bool) -> dict[str, Any]:
    return {"env": env, "allowed": allowed, "kind": kind, "doc": doc, "shown": shown, "secret": secret}


def number(default: float, env: str, low: float, high: float, doc: str, *, above: bool = False) -> Any:
    """A number (seconds, a ratio) from ``low`` to ``high`` (above ``low`` with ``above``)."""
    allowed = f"a number above {low:g} and at most {high:g}" if above else f"a number from {low:g} to {high:g}"
    meta = _meta(env, allowed, "number", doc, None, False)
    if above:
        return Field(default, gt=low, le=high, allow_inf_nan=False, json_schema_extra=meta)
    return Field(default, ge=low, le=high, allow_inf_nan=False, json_schema_extra=meta)


def whole(default: int | None, env: str, low: int, high: int, doc: str, shown: str | None = None) -> Any:
    allowed = f"a whole number from {low} to {high}"
    return Field(default, ge=low, le=high, json_schema_extra=_meta(env, allowed, "whole number", doc, shown, False))


def choice(default: str, env: str, choices: tuple[str, ...], doc: str) -> Any:
    return Field(default, json_schema_extra=_meta(env, f"one of {', '.join(choices)}", "choice", doc, None, False))


def flag(default: bool | None, env: str, doc: str, shown: str | None = None) -> Any:
    allowed = "true or false (in the environment also 1/0, yes/no, on/off)"
    return Field(default, json_schema_extra=_meta(env, allowed, "boolean", doc, shown, False))


def path(default: str | None, env: str, doc: str, shown: str | None = None) -> Any:
    return Field(default, json_schema_extra=_meta(env, "an absolute path", "path", doc, shown, False))


def text(default: Any, env: str, allowed: str, doc: str, *, kind: str = "string", shown: str | None = None,
         secret: bool = False) -> Any:  # fmt: skip
    return Field(default, json_schema_extra=_meta(env, allowed, kind, doc, shown, secret))


# -- value checks (a ValueError's text is not shown: the key's ``allowed`` sentence is, after a Detail's) -----


class Detail(ValueError):
    """A check's finding worth saying before what is allowed: which entry of a list is wrong."""


def _strip(v: Any) -> Any:
    return v.strip() if isinstance(v, str) else v


def _lower(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v


def _none_if_empty(v: Any) -> Any:
    v = _strip(v)
    return None if v == "" else v


def _split(seps: str) -> Any:
    def split(v: Any) -> Any:
        if isinstance(v, str):
            for sep in seps[1:]:
                v = v.replace(sep, seps[0])
            return [p.strip() for p in v.split(seps[0]) if p.strip()]
        return v

    return split


def _split_keep_empty(v: Any) -> Any:
    """A comma list whose empty entries count (a member without a metrics URL)."""
    return [p.strip() for p in v.split(",")] if isinstance(v, str) else v


def _absolute(p: str | None) -> str | None:
    if p is not None and (not p.startswith("/") or "\n" in p or "\0" in p):
        raise ValueError("not an absolute path")
    return p


def _roots(roots: list[str]) -> list[str]:
    if not roots:
        raise ValueError("no directory")
    for r in roots:
        if not r.startswith("/") or ".." in r.split("/") or "\n" in r:
            raise Detail(f"{r!r} is not an absolute directory path")
    return roots


def _networks(items: list[str]) -> list[str]:
    for p in items:
        try:
            ipaddress.ip_network(p)
        except ValueError:
            raise Detail(f"{p!r} is no IP address or network") from None
    return items


def _urls(items: list[str]) -> list[str]:
    for u in items:
        if u and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", u):
            raise Detail(f"{u!r} is no http(s) URL")
    return items


def _roles(items: list[str]) -> list[str]:
    items = [r.lower() for r in items]
    bad = sorted(set(items) - set(ROLE_NAMES))
    if bad:
        raise Detail(f"{', '.join(bad)} is no role")
    return items


def split_listen(addr: str) -> tuple[str, int]:
    """``host:port`` or a URL → (host, port); no port: 8470. A port that is no number from 1 to 65535 is a
    ValueError."""
    rest = addr.split("://", 1)[1] if "://" in addr else addr
    hostport = rest.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or hostport.endswith("]"):  # no port given
        return hostport.strip("[]") or "127.0.0.1", 8470
    if not port:
        return host.strip("[]") or "127.0.0.1", 8470
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("the port must be a number from 1 to 65535")
    return host.strip("[]") or "127.0.0.1", int(port)


def _listen(addr: str) -> str:
    if not addr or any(c.isspace() for c in addr):
        raise ValueError("empty")
    split_listen(addr)
    return addr


def _syslog(target: str | None) -> str | None:
    if target is None or target.startswith("/"):
        return target
    host, sep, port = target.rpartition(":")
    if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("neither host:port nor a socket path")
    return target


def _notify_syslog(target: str | None) -> str | None:
    """As kasou.control.notify_channels.parse_syslog takes it: udp://HOST:PORT, tcp://HOST:PORT or local."""
    if target is None or target == "local":
        return target
    scheme, sep, rest = target.partition("://")
    host, colon, port = rest.rpartition(":")
    if not (sep and scheme in ("udp", "tcp") and colon and host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("neither udp://HOST:PORT, tcp://HOST:PORT nor local")
    return target


def _hostname(name: str | None) -> str | None:
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", name):
        raise ValueError("not a host name")
    return name


def _ifname(name: str | None) -> str | None:
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", name):
        raise ValueError("not an interface name")
    return name


def _email(a: str | None) -> str | None:
    if a is not None and not re.fullmatch(r"[^@\s<>,]+@[^@\s<>,]+", a):
        raise ValueError("not a mail address")
    return a


def _emails(items: list[str]) -> list[str]:
    for a in items:
        if not re.fullmatch(r"[^@\s<>,]+@[^@\s<>,]+", a):
            raise Detail(f"{a!r} is no mail address")
    return items


def _long_secret(v: str | None) -> str | None:
    if v is not None and len(v) < 16:
        raise ValueError("too short")
    return v


def _one_line(v: str | None) -> str | None:
    """Text for one protocol line (an SMTP login): no control characters, at most 255 characters."""
    if v is not None and (len(v) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in v)):
        raise ValueError("not one line")
    return v


def _http_url(u: str | None) -> str | None:
    if u is not None:
        _urls([u])
    return u


def _hostaddr(h: str | None) -> str | None:
    if h is not None and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})|\[?[0-9A-Fa-f:.]+\]?", h):
        raise ValueError("not a host")
    return h


Choice = BeforeValidator(_lower)
OptPath = Annotated[str | None, BeforeValidator(_none_if_empty), AfterValidator(_absolute)]
AbsPath = Annotated[str, BeforeValidator(_strip), AfterValidator(_absolute)]
OptText = Annotated[str | None, BeforeValidator(_none_if_empty)]
CommaList = Annotated[list[str], BeforeValidator(_split(","))]


def _routes(v: Any) -> Any:
    """Route tables as the file gives them, or the environment's JSON text; each checked, the first fault named
    (``route 2: color: not a field of a route``)."""
    if isinstance(v, str):
        try:
            v = json.loads(v) if v.strip() else []
        except ValueError as e:
            raise Detail(f"not JSON ({e})") from None
    if not isinstance(v, list):
        raise Detail("not a list of tables")
    routes = []
    for i, item in enumerate(v, 1):
        try:
            routes.append(NotifyRoute.model_validate(item))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "the route"
            what = "not a field of a route" if err["type"] == "extra_forbidden" else err["msg"].lower()
            raise Detail(f"route {i}: {where}: {what}") from None
    return routes


class NotifyRoute(BaseModel):
    """One department's events to that department's contacts (``[[notify.route]]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    department: str = Field(min_length=1, max_length=63)
    mail_to: list[str] = []
    webhook: str | None = None
    webhook_secret: str | None = Field(default=None, repr=False)
    min_severity: Literal["info", "warning", "error", "critical"] | None = None  # None: the site's


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSection(Section):
    listen: Annotated[str, BeforeValidator(_strip), AfterValidator(_listen)] = text(
        DEFAULT_API,
        "KASOU_API",
        "host:port or a URL (e.g. 127.0.0.1:8470, https://10.0.0.11:8470), port 1 to 65535",
        "where the API listens and the CLI connects; without a scheme plain HTTP on loopback, https:// elsewhere",
    )
    trusted_proxies: Annotated[CommaList, AfterValidator(_networks)] = text(
        [],
        "KASOU_TRUSTED_PROXIES",
        "a list of IP addresses or networks (e.g. 10.0.0.5, 10.1.0.0/16)",
        "reverse proxies whose X-Forwarded-For is believed (docs/audit.md)",
        kind="list",
        shown="none",
    )
    token_file: OptPath = path(
        None, "KASOU_TOKEN_FILE", "the API token (one file shared by a cluster's hosts)", "HOME/api.token"
    )
    secrets_key: OptPath = path(
        None,
        "KASOU_SECRETS_KEY",
        "the key that seals secrets kept in the store (0600)",
        "beside the SQLite store, else beside the token file",
    )


class PathsSection(Section):
    home: AbsPath = path("/var/lib/kasou", "KASOU_HOME", "the state directory: store, disks, sockets, logs, token")
    images: AbsPath = path("/var/lib/kasou/images", "KASOU_IMAGES", "built guest images (shared by every home)")
    transfer_dir: OptPath = path(
        None, "KASOU_TRANSFER_DIR", "files to import and the OVAs exported (docs/import.md)", "HOME/transfer"
    )
    shared_dir: OptPath = path(None, "KASOU_SHARED_DIR", "storage every host mounts at this same path", "none")
    ovmf_dir: AbsPath = path("/usr/share/OVMF", "KASOU_OVMF_DIR", "the UEFI firmware images (Debian's ovmf)")
    novnc_dir: AbsPath = path("/usr/share/novnc", "KASOU_NOVNC_DIR", "where noVNC is served from")


class TlsSection(Section):
    dir: OptPath = path(None, "KASOU_TLS_DIR", "this host's TLS files: ca.crt, host.crt, host.key", "HOME/tls")
    ca: OptPath = path(None, "KASOU_CA", "the CA to trust (the site CA or the hospital's bundle)", "TLS_DIR/ca.crt")
    cert: OptPath = path(None, "KASOU_TLS_CERT", "this host's certificate", "TLS_DIR/host.crt")
    key: OptPath = path(None, "KASOU_TLS_KEY", "this host's private key", "TLS_DIR/host.key")


class HostSection(Section):
    name: Annotated[OptText, AfterValidator(_hostname)] = text(
        None,
        "KASOU_HOST_NAME",
        "a host name: letters, digits and -, at most 63",
        "this host's name in kasou",
        shown="the system host name",
    )
    uplink: Annotated[OptText, AfterValidator(_ifname)] = text(
        None,
        "KASOU_UPLINK",
        "an interface name (letters, digits, _.@-; at most 15)",
        "the interface that carries the VM networks off this host, their VLANs tagged on it",
        shown="none",
    )
    accel: Annotated[Literal["auto", "kvm", "tcg"], Choice] = choice(
        "auto", "KASOU_ACCEL", ("auto", "kvm", "tcg"), "kvm or tcg skip the KVM probe; auto probes"
    )
    vcpu_ratio: float = number(4.0, "KASOU_VCPU_RATIO", 0, 64, "vCPUs a host may carry per CPU", above=True)
    storage_roots: Annotated[list[str], BeforeValidator(_split(":,")), AfterValidator(_roots)] = text(
        list(DEFAULT_STORAGE_ROOTS),
        "KASOU_STORAGE_ROOTS",
        "a list of absolute directory paths (in the environment separated by : or ,)",
        "the directories storage pools may be made under (docs/storage.md)",
        kind="list",
    )


class ClusterSection(Section):
    etcd: Annotated[CommaList, AfterValidator(_urls)] = text(
        [],
        "KASOU_ETCD",
        "a list of etcd client URLs (http:// or https://)",
        "the etcd members of a cluster; none: the embedded SQLite store",
        kind="list",
        shown="none",
    )
    etcd_metrics: Annotated[list[str], BeforeValidator(_split_keep_empty), AfterValidator(_urls)] = text(
        [],
        "KASOU_ETCD_METRICS",
        "a list of http(s) URLs, at most one per member of cluster.etcd, in its order",
        "each etcd member's metrics URL (--listen-metrics-urls); the host guard asks them",
        kind="list",
        shown="none",
    )


class HaSection(Section):
    lease_ttl: float = number(6.0, "KASOU_HA_LEASE_TTL", 3, 300, "seconds a host's lease lives without renewal")
    fence_margin: float = number(
        2.0,
        "KASOU_HA_FENCE_MARGIN",
        0.5,
        150,
        "seconds between the fence and the lease's expiry; at most half of ha.lease_ttl",
    )
    heartbeat_timeout: float = number(
        30.0, "KASOU_HA_HEARTBEAT_TIMEOUT", 5, 3600, "seconds a guest may stay silent before it is reset"
    )
    watchdog: OptPath = path(None, "KASOU_HA_WATCHDOG", "the kernel's watchdog device the guard feeds", "none")
    vendor_max_priority: int = whole(
        50, "KASOU_VENDOR_MAX_PRIORITY", 0, 100, "the highest HA restart priority a vendor may give their VMs"
    )


class MaintenanceSection(Section):
    attempts: int = whole(3, "KASOU_MAINTENANCE_ATTEMPTS", 1, 20, "moves per VM while a host empties")
    retry_s: float = number(1800.0, "KASOU_MAINTENANCE_RETRY_S", 0, 86400, "seconds after which no new move starts")
    backoff_s: float = number(10.0, "KASOU_MAINTENANCE_BACKOFF_S", 0, 600, "the first wait between two moves")


class BackupSection(Section):
    dir: OptPath = path(None, "KASOU_BACKUP_DIR", "where a host writes backup generations", "HOME/backups")
    keep: int | None = whole(
        None,
        "KASOU_BACKUP_KEEP",
        1,
        1000,
        "generations kept per VM without a policy",
        "by criticality: 5 for 24h-clinical, 3 for the others",
    )


class RecordingSection(Section):
    dir: OptPath = path(None, "KASOU_RECORDING_DIR", "where an API server keeps console recordings", "HOME/recordings")
    days: int = whole(400, "KASOU_RECORDING_DAYS", 1, 3650, "days a console recording is kept after its end")


class AuditSection(Section):
    syslog: Annotated[OptText, AfterValidator(_syslog)] = text(
        None,
        "KASOU_AUDIT_SYSLOG",
        "host:port (UDP) or a socket path such as /dev/log",
        "a copy of every audit record to syslog",
        shown="none",
    )
    key: OptPath = path(None, "KASOU_AUDIT_KEY", "the checkpoint signing key (0600)", "beside the store, else HOME")
    anchor: OptPath = path(
        None, "KASOU_AUDIT_ANCHOR", "the append-only file checkpoints are anchored in", "beside the store, else HOME"
    )
    checkpoint_minutes: float = number(
        10.0, "KASOU_AUDIT_CHECKPOINT_MINUTES", 0, 10**9, "a signed checkpoint at least this often (minutes)"
    )
    checkpoint_every: int = whole(
        100, "KASOU_AUDIT_CHECKPOINT_EVERY", 1, 10**9, "a signed checkpoint every this many records"
    )


class SessionSection(Section):
    idle: float = number(900.0, "KASOU_SESSION_IDLE", 0, 10**9, "seconds without a request before a session ends")
    max: float = number(43200.0, "KASOU_SESSION_MAX", 0, 10**9, "seconds after sign-in a session ends at most")
    console_idle: float = number(
        900.0, "KASOU_CONSOLE_IDLE", 0, 10**9, "seconds without a byte either way before a console closes"
    )
    signin_rate: float = number(
        10.0, "KASOU_SIGNIN_RATE", 0, 10**9, "failed sign-ins a minute allowed from one address (0: no bound)"
    )
    require_totp_for: Annotated[CommaList, AfterValidator(_roles)] = text(
        [],
        "KASOU_REQUIRE_TOTP_FOR",
        f"a list of roles: {', '.join(ROLE_NAMES)}",
        "the roles that sign in only with a TOTP code",
        kind="list",
        shown="none",
    )
    require_totp_for_admins: bool | None = flag(
        None, "KASOU_REQUIRE_TOTP_FOR_ADMINS", "the older setting: true adds admin to session.require_totp_for", "false"
    )
    directory_recheck: float = number(
        300.0, "KASOU_DIRECTORY_RECHECK", 5, 86400, "seconds between checks of a directory user against the directory"
    )
    break_glass_file: OptPath = path(
        None, "KASOU_BREAK_GLASS_FILE", "the break-glass password's hash (0600)", "beside the store, else HOME"
    )


class ConfineSection(Section):
    enabled: bool = flag(True, "KASOU_CONFINE", "each VM's QEMU as its own uid, sandboxed, in its own cgroup")
    uid_base: int = whole(64000, "KASOU_VM_UID_BASE", 1000, 2**31 - 100_000, "the first uid kept for VMs")
    uid_count: int = whole(1000, "KASOU_VM_UID_COUNT", 1, 65536, "how many uids are kept for VMs")
    memory_overhead_mib: int = whole(
        512, "KASOU_QEMU_MEMORY_OVERHEAD_MIB", 64, 65536, "MiB a QEMU may use beyond its guest's memory"
    )


class NotifySection(Section):
    webhook: Annotated[OptText, AfterValidator(_http_url)] = text(
        None, "KASOU_NOTIFY_WEBHOOK", "an http(s) URL", "events are POSTed there as JSON", shown="none", secret=True
    )
    webhook_secret: Annotated[OptText, AfterValidator(_long_secret)] = text(
        None, "KASOU_NOTIFY_WEBHOOK_SECRET", "text of at least 16 characters",
        "signs each webhook request (HMAC-SHA256 of the body)", kind="secret", shown="none", secret=True,
    )  # fmt: skip
    smtp_host: Annotated[OptText, AfterValidator(_hostaddr)] = text(
        None, "KASOU_NOTIFY_SMTP_HOST", "a host name or IP address", "the mail relay", shown="none"
    )
    smtp_port: int = whole(25, "KASOU_NOTIFY_SMTP_PORT", 1, 65535, "the mail relay's port")
    mail_from: Annotated[OptText, AfterValidator(_email)] = text(
        None, "KASOU_NOTIFY_MAIL_FROM", "a mail address (name@domain)", "the sender of notification mails", shown="none"
    )
    mail_to: Annotated[CommaList, AfterValidator(_emails)] = text(
        [],
        "KASOU_NOTIFY_MAIL_TO",
        "a list of mail addresses",
        "who receives notification mails",
        kind="list",
        shown="none",
    )
    syslog: Annotated[OptText, AfterValidator(_notify_syslog)] = text(
        None,
        "KASOU_NOTIFY_SYSLOG",
        "udp://HOST:PORT, tcp://HOST:PORT or local (/dev/log)",
        "notifications to syslog",
        shown="none",
    )
    min_severity: Annotated[Literal["info", "warning", "error", "critical"], Choice] = choice(
        "warning", "KASOU_NOTIFY_MIN_SEVERITY", SEVERITIES, "events below this severity are not sent"
    )
    webhook_attempts: int = whole(5, "KASOU_NOTIFY_WEBHOOK_ATTEMPTS", 1, 20, "tries of each webhook request")
    webhook_backoff: float = number(
        1.0, "KASOU_NOTIFY_WEBHOOK_BACKOFF", 0, 600, "seconds before the second try of a webhook, doubled each time"
    )
    smtp_starttls: bool = flag(False, "KASOU_NOTIFY_SMTP_STARTTLS", "STARTTLS to the mail relay before sending")
    smtp_user: Annotated[OptText, AfterValidator(_one_line)] = text(
        None, "KASOU_NOTIFY_SMTP_USER", "a user name (one line, at most 255 characters)", "the mail relay's login",
        shown="none",
    )  # fmt: skip
    smtp_password: Annotated[OptText, AfterValidator(_one_line)] = text(
        None, "KASOU_NOTIFY_SMTP_PASSWORD", "text (one line, at most 255 characters)",
        "the mail relay's password (with smtp_user)",
        kind="secret", shown="none", secret=True,
    )  # fmt: skip
    route: Annotated[list[NotifyRoute], BeforeValidator(_routes)] = text(
        [], "KASOU_NOTIFY_ROUTES",
        "tables with department and mail_to and/or webhook (webhook_secret, min_severity); in the environment "
        "a JSON list of objects",
        "one department's events also to its own contacts ([[notify.route]] tables)",
        kind="list of tables", shown="none", secret=True,
    )  # fmt: skip


class Settings(BaseSettings):
    """Every setting of kasou. The sources, strongest first: the environment (``KASOU_*``), the TOML file
    (``KASOU_CONFIG``, else /etc/kasou/kasou.toml), the defaults. Read it with :func:`kasou.settings.current`,
    which says where each value came from and keeps a bad value's error to its own key."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    api: ApiSection = ApiSection()
    paths: PathsSection = PathsSection()
    tls: TlsSection = TlsSection()
    host: HostSection = HostSection()
    cluster: ClusterSection = ClusterSection()
    ha: HaSection = HaSection()
    maintenance: MaintenanceSection = MaintenanceSection()
    backup: BackupSection = BackupSection()
    recording: RecordingSection = RecordingSection()
    audit: AuditSection = AuditSection()
    session: SessionSection = SessionSection()
    confine: ConfineSection = ConfineSection()
    notify: NotifySection = NotifySection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, EnvSource(settings_cls), TomlSource(settings_cls)


@dataclass(frozen=True)
class Key:
    """One setting: ``[section] name`` in the file, ``env`` in the environment."""

    section: str
    name: str
    env: str
    allowed: str
    kind: str
    doc: str
    default: Any
    shown: str | None  # the default as words, where the value is derived (HOME/backups) or absent
    secret: bool

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        return show(self.default)


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "none"
    return "none" if value is None else str(value)


def _keys() -> list[Key]:
    keys = []
    for section, sfield in Settings.model_fields.items():
        model = sfield.annotation
        assert isinstance(model, type) and issubclass(model, Section)
        for name, f in model.model_fields.items():
            m = f.json_schema_extra
            assert isinstance(m, dict), (section, name)
            shown = None if m["shown"] is None else str(m["shown"])
            keys.append(Key(section, name, str(m["env"]), str(m["allowed"]), str(m["kind"]), str(m["doc"]),
                            f.default, shown, bool(m["secret"])))  # fmt: skip
    return keys


KEYS: list[Key] = _keys()
BY_DOTTED: dict[str, Key] = {k.dotted: k for k in KEYS}
BY_ENV: dict[str, Key] = {k.env: k for k in KEYS}
SECTIONS: dict[str, list[Key]] = {}
for _k in KEYS:
    SECTIONS.setdefault(_k.section, []).append(_k)
