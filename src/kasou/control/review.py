"""The access-log review: the month's report a hospital's information-security officer reads and signs
(``kasou audit review``, ``GET /v1/audit/review``; MHLW guideline: access logs are reviewed regularly).

Built from the audit log (:mod:`kasou.control.audit`) of a period: the chain's verification result first (the whole
log, whatever the period), then sign-ins per user and source, failed sign-ins and lock-outs, break-glass uses (and
whether an administrator acknowledged each), the vendors' maintenance windows of the period with what was done in
them (:meth:`kasou.control.maintenance.MaintenanceWindows.report`), console sessions, permission changes, and
sign-ins and actions at unusual hours (outside working hours in the hospital's time zone, or on a weekend).

A department's review (``department``) keeps what concerns that department: its VMs (and their consoles and jobs'
windows), its users (their sign-ins and permission changes), its windows. Break-glass uses and anonymous failures
concern the whole site and are left out of a department's review. Rendering is elsewhere (:mod:`kasou.api.review_html`).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel

from kasou.control import audit
from kasou.control.audit.chain import parse_time
from kasou.control.maintenance import MaintenanceWindows
from kasou.control.records import VMRecord
from kasou.errors import InvalidSpec
from kasou.model.maintenance import WindowRecord
from kasou.model.names import validate_name
from kasou.model.timeofday import parse_hhmm
from kasou.store.base import Store

DEFAULT_TZ = "Asia/Tokyo"
DEFAULT_HOURS = "07:00-20:00"
LINES_MAX = 500  # lines listed in one section (the counts cover all)
MAX_PERIOD_S = 400 * 86400
SIGNINS = ("login", "break_glass_login")
_RELATIVE = re.compile(r"^(\d{1,4})([hdw])$")
_UNIT_S = {"h": 3600, "d": 86400, "w": 7 * 86400}


# -- the report's parts ----------------------------------------------------------------------------------------


class Line(BaseModel):
    """One audit record, as the report lists it."""

    seq: int
    time: str  # UTC, ISO 8601
    local: str  # the hospital's local time, "YYYY-MM-DD HH:MM (Mon)"
    actor: str  # a user's name ("" for an anonymous request or the system)
    role: str
    source: str
    action: str
    target: str
    ok: bool
    message: str = ""


class SignIns(BaseModel):
    user: str
    role: str
    source: str
    count: int
    first: str  # local time
    last: str


class BreakGlassUse(BaseModel):
    line: Line
    acknowledged: bool
    acknowledged_by: str | None = None
    acknowledged_at: str | None = None  # local time


class WindowSummary(BaseModel):
    id: str
    vendor: str
    state: str
    vms: list[str]
    departments: list[str]
    starts: str  # local time
    ends: str
    plan: str
    requested_by: str
    decided_by: str | None
    revoked_by: str | None
    actions: int
    refused: int
    summary: dict[str, int]  # action -> how many


class ConsoleSession(BaseModel):
    seq: int
    opened: str  # local time
    user: str
    role: str
    vm: str
    source: str
    kind: str
    duration_s: float | None  # None: still open, or its close record is not in the period
    bytes_from_client: int | None
    bytes_to_client: int | None
    recording: str | None  # the recording's id, when the record carries one
    window: str | None
    ok: bool
    reason: str


class PermissionChange(BaseModel):
    line: Line
    kind: str  # user_created, user_deleted, password_set, departments_set, pools_set, token_created, ...


class Unusual(BaseModel):
    hours: str  # working hours, "07:00-20:00"
    weekends: bool  # weekends count as unusual
    signins: int
    actions: int
    by_user: dict[str, int]
    lines: list[Line]


class Review(BaseModel):
    since: str  # UTC, ISO 8601
    until: str
    since_local: str
    until_local: str
    tz: str
    department: list[str] | None  # None: the whole site
    generated_at: str  # local time
    verify: audit.VerifyReport
    records: int  # audit records in the period (and the department)
    signins: list[SignIns]
    failed_signins: list[Line]
    failed_total: int  # failed sign-ins, anonymous failures summed up included
    lockouts: list[Line]
    break_glass: list[BreakGlassUse]
    windows: list[WindowSummary]
    consoles: list[ConsoleSession]
    permission_changes: list[PermissionChange]
    unusual: Unusual
    truncated: list[str]  # sections whose lines were cut at LINES_MAX


# -- the period ----------------------------------------------------------------------------------------------------


def zone(name: str) -> ZoneInfo:
    try:
        if not name or len(name) > 64 or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError, UnicodeError):
        raise InvalidSpec(f"no time zone named {name[:64]!r} (e.g. Asia/Tokyo)", field="tz") from None


def parse_when(text: str, tz: ZoneInfo, now: float, field: str) -> float:
    """``30d``, ``12h``, ``2w`` (before now), or an ISO date or time (the hospital's local time unless it has a
    zone; a date alone is its midnight)."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - int(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidSpec(
            f"{field} is like 30d, 12h, 2w or 2026-11-01 (ISO 8601), not {text[:40]!r}", field=field
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    return when.timestamp()


def parse_hours(text: str) -> tuple[int, int]:
    """``07:00-20:00`` as minutes of the day (start, end); the end after the start."""
    start, sep, end = text.partition("-")
    if not sep:
        raise InvalidSpec(f"working hours are like 07:00-20:00, not {text[:40]!r}", field="hours")
    h1, m1 = parse_hhmm(start.strip(), "--hours", "hours")
    h2, m2 = parse_hhmm(end.strip(), "--hours", "hours")
    if h2 * 60 + m2 <= h1 * 60 + m1:
        raise InvalidSpec(f"working hours end after they start, not {text[:40]!r}", field="hours")
    return h1 * 60 + m1, h2 * 60 + m2


def _ts(rec: dict[str, Any]) -> float:
    try:
        return parse_time(str(rec.get("time", "")))
    except InvalidSpec:
        return 0.0


# -- building it ---------------------------------------------------------------------------------------------------


class Reviewer:
    """Builds a :class:`Review` from the store (its audit log, VMs, users, windows)."""

    def __init__(self, store: Store, windows: MaintenanceWindows, clock: Any = time.time) -> None:
        self.store = store
        self.windows = windows
        self.clock = clock

    async def review(
        self,
        since: str = "30d",
        until: str | None = None,
        department: list[str] | None = None,
        tz: str = DEFAULT_TZ,
        hours: str = DEFAULT_HOURS,
        weekends: bool = True,
    ) -> Review:
        zi = zone(tz)
        now = self.clock()
        start = parse_when(since, zi, now, "since")
        end = parse_when(until, zi, now, "until") if until else now
        if end <= start:
            raise InvalidSpec("the period ends after it starts (--until after --since)", field="until")
        if end - start > MAX_PERIOD_S:
            raise InvalidSpec(f"a review covers at most {MAX_PERIOD_S // 86400} days", field="since")
        work = parse_hours(hours)
        for d in department or []:
            validate_name(d, "department")
        log = audit.for_store(self.store)
        everything = await log.records()
        verify = await log.verify()
        scope = await self._scope(department) if department else None
        recs = [r for r in everything if start <= _ts(r) < end and (scope is None or scope.covers(r))]

        def line(r: dict[str, Any]) -> Line:
            a, res = r.get("actor") or {}, r.get("result") or {}
            return Line(
                seq=int(r.get("seq") or 0),
                time=str(r.get("time", "")),
                local=_local(_ts(r), zi),
                actor=str(a.get("name") or ""),
                role=str(a.get("role") or ""),
                source=str(r.get("source") or ""),
                action=str(r.get("action", "")),
                target=str(r.get("target", "")),
                ok=bool(res.get("ok", True)),
                message=str(res.get("message") or ""),
            )

        truncated: list[str] = []

        def cut(name: str, items: list[Any]) -> list[Any]:
            if len(items) > LINES_MAX:
                truncated.append(name)
                return items[-LINES_MAX:]
            return items

        signins: dict[tuple[str, str], SignIns] = {}
        failed: list[Line] = []
        failed_total = 0
        lockouts: list[Line] = []
        uses: list[BreakGlassUse] = []
        perms: list[PermissionChange] = []
        for r in recs:
            action, ok = str(r.get("action", "")), bool((r.get("result") or {}).get("ok", True))
            if action in SIGNINS and ok:
                ln = line(r)
                who = ln.actor or ln.target.removeprefix("users/")
                key = (who, ln.source)
                s = signins.get(key)
                if s is None:
                    signins[key] = SignIns(
                        user=who, role=ln.role, source=ln.source, count=1, first=ln.local, last=ln.local
                    )
                else:
                    s.count, s.last = s.count + 1, ln.local
            if action == "login_failed" or (action in SIGNINS and not ok):
                failed.append(line(r))
                failed_total += 1
            elif action == "anonymous_failures":
                failed.append(line(r))
                count = (r.get("details") or {}).get("count")
                failed_total += count if isinstance(count, int) and count > 0 else 1
            elif action == "lockout":
                lockouts.append(line(r))
            if action == "break_glass_login" and scope is None:
                uses.append(_acknowledged(line(r), everything, zi))
            kind = permission_kind(action, ok)
            if kind is not None:
                perms.append(PermissionChange(line=line(r), kind=kind))
        return Review(
            since=_iso(start),
            until=_iso(end),
            since_local=_local(start, zi),
            until_local=_local(end, zi),
            tz=tz,
            department=department or None,
            generated_at=_local(now, zi),
            verify=verify,
            records=len(recs),
            signins=sorted(signins.values(), key=lambda s: (s.user, s.source)),
            failed_signins=cut("failed", failed),
            failed_total=failed_total,
            lockouts=cut("lockouts", lockouts),
            break_glass=cut("break_glass", uses),
            windows=await self._windows(start, end, department, zi),
            consoles=cut("consoles", _consoles(recs, zi)),
            permission_changes=cut("permission_changes", perms),
            unusual=_unusual(recs, zi, work, weekends, line, cut),
            truncated=truncated,
        )

    async def _scope(self, department: list[str]) -> _Scope:
        vms: dict[str, str | None] = {}
        for e in await self.store.range("vms/"):
            rec = VMRecord.model_validate(e.value)
            vms[rec.name] = rec.department
        users: set[str] = set()
        for e in await self.store.range("users/"):
            if isinstance(e.value, dict) and set(e.value.get("departments") or []) & set(department):
                users.add(str(e.value.get("name") or e.key.removeprefix("users/")))
        windows = {w.id: w for w in await self.windows.all()}
        jobs: dict[str, str | None] = {}
        for e in await self.store.range("jobs/"):
            if isinstance(e.value, dict) and isinstance(e.value.get("id"), str):
                jobs[e.value["id"]] = e.value.get("department") or vms.get(str(e.value.get("vm")))
        return _Scope(set(department), vms, users, windows, jobs)

    async def _windows(
        self, start: float, end: float, department: list[str] | None, zi: ZoneInfo
    ) -> list[WindowSummary]:
        out = []
        for w in await self.windows.all():
            if not (w.starts_at < end and w.ends_at > start) and not start <= w.requested_at < end:
                continue
            if department and not w.seen_by(department):
                continue
            rep = await self.windows.report(w.id)
            out.append(
                WindowSummary(
                    id=w.id,
                    vendor=w.vendor,
                    state=rep.window.state.value,
                    vms=w.vms,
                    departments=sorted(w.touched_departments()),
                    starts=_local(w.starts_at, zi),
                    ends=_local(w.ends_at, zi),
                    plan=w.plan,
                    requested_by=w.requested_by,
                    decided_by=w.decided_by,
                    revoked_by=w.revoked_by,
                    actions=len(rep.actions),
                    refused=rep.refused,
                    summary=rep.summary,
                )
            )
        return out


class _Scope:
    """Which records concern a set of departments."""

    def __init__(
        self,
        departments: set[str],
        vms: dict[str, str | None],
        users: set[str],
        windows: dict[str, WindowRecord],
        jobs: dict[str, str | None],
    ) -> None:
        self.departments, self.vms, self.users, self.windows, self.jobs = departments, vms, users, windows, jobs

    def covers(self, r: dict[str, Any]) -> bool:
        details = r.get("details") or {}
        wid = details.get("window") if isinstance(details, dict) else None
        if isinstance(wid, str) and wid in self.windows:
            return self.windows[wid].seen_by(tuple(self.departments))
        kind, _, name = str(r.get("target", "")).partition("/")
        name = name.split("/")[0]
        if kind == "vms":
            return self.vms.get(name) in self.departments
        if kind == "jobs":
            return self.jobs.get(name) in self.departments
        if kind == "maintenance-windows":
            w = self.windows.get(name)
            return w is not None and w.seen_by(tuple(self.departments))
        if kind == "users" and name in self.users:
            return True
        actor = (r.get("actor") or {}).get("name")
        return actor in self.users and r.get("action") not in ("anonymous_failures",)


# -- the sections -------------------------------------------------------------------------------------------------


def permission_kind(action: str, ok: bool) -> str | None:
    """What a record changed of someone's rights (None: nothing). Refused attempts count too (marked by ``ok``)."""
    method, _, path = action.partition(" ")
    if action == "break_glass_rotate":
        return "break_glass_password_set"
    if method not in ("POST", "PUT", "PATCH", "DELETE"):
        return None
    parts = path.removeprefix("/v1/").split("/")
    if parts[:3] == ["auth", "me", "password"]:
        return "own_password_set"
    if parts[:3] == ["auth", "me", "totp"]:
        return "own_totp_set"
    if parts[0] != "users" or parts[1:2] == ["break-glass"]:
        return None
    rest = parts[2:]
    if not rest:
        return (
            {"POST": "user_created", "DELETE": "user_deleted"}.get(method, "user_changed") if len(parts) <= 2 else None
        )
    table = {"password": "password_set", "departments": "departments_set", "pools": "pools_set", "role": "role_set"}
    if rest[0] in table:
        return table[rest[0]]
    if rest[0] == "tokens":
        return "token_revoked" if method == "DELETE" else "token_created"
    if rest[0] == "totp":
        return "totp_removed" if method == "DELETE" else "totp_set"
    return None  # signing a user out changes no right


def _acknowledged(use: Line, everything: list[dict[str, Any]], zi: ZoneInfo) -> BreakGlassUse:
    """Was the use acknowledged by an administrator later (``kasou user break-glass-ack``, any time after it)?"""
    for r in everything:
        later = int(r.get("seq") or 0) > use.seq
        if later and r.get("action") == "break_glass_acknowledge" and (r.get("result") or {}).get("ok"):
            by = (r.get("actor") or {}).get("name")
            return BreakGlassUse(
                line=use, acknowledged=True, acknowledged_by=str(by) if by else None, acknowledged_at=_local(_ts(r), zi)
            )
    return BreakGlassUse(line=use, acknowledged=False)


def _consoles(recs: list[dict[str, Any]], zi: ZoneInfo) -> list[ConsoleSession]:
    """console_open records, each with its console_close (same console id) when it is in the period."""
    closes: dict[str, dict[str, Any]] = {}
    for r in recs:
        d = r.get("details") or {}
        if r.get("action") == "console_close" and isinstance(d.get("console"), str):
            closes[d["console"]] = r
    out = []
    for r in recs:
        if r.get("action") != "console_open":
            continue
        d, a, res = r.get("details") or {}, r.get("actor") or {}, r.get("result") or {}
        c = closes.get(str(d.get("console")))
        cd = (c.get("details") or {}) if c else {}
        rec_id = cd.get("recording") or d.get("recording")
        if isinstance(rec_id, dict):
            rec_id = rec_id.get("id")
        out.append(
            ConsoleSession(
                seq=int(r.get("seq") or 0),
                opened=_local(_ts(r), zi),
                user=str(a.get("name") or ""),
                role=str(a.get("role") or ""),
                vm=str(r.get("target", "")).removeprefix("vms/"),
                source=str(r.get("source") or ""),
                kind=str(d.get("kind") or ""),
                duration_s=_num(cd.get("duration_s")),
                bytes_from_client=_int(cd.get("bytes_from_client")),
                bytes_to_client=_int(cd.get("bytes_to_client")),
                recording=str(rec_id) if rec_id else None,
                window=str(d.get("window")) if d.get("window") else None,
                ok=bool(res.get("ok", True)),
                reason=str(cd.get("reason") or res.get("message") or ""),
            )
        )
    return out


def _unusual(
    recs: list[dict[str, Any]], zi: ZoneInfo, work: tuple[int, int], weekends: bool, line: Any, cut: Any
) -> Unusual:
    signins = actions = 0
    by_user: dict[str, int] = {}
    lines = []
    for r in recs:
        a = r.get("actor") or {}
        if not a.get("name") or a.get("role") == "system":
            continue  # the system's own actions (HA) and anonymous failures are not a person at work
        t = dt.datetime.fromtimestamp(_ts(r), zi)
        minute = t.hour * 60 + t.minute
        if work[0] <= minute < work[1] and not (weekends and t.weekday() >= 5):
            continue
        if r.get("action") in SIGNINS:
            signins += 1
        else:
            actions += 1
        by_user[str(a["name"])] = by_user.get(str(a["name"]), 0) + 1
        lines.append(line(r))
    hours = f"{work[0] // 60:02d}:{work[0] % 60:02d}-{work[1] // 60:02d}:{work[1] % 60:02d}"
    return Unusual(
        hours=hours,
        weekends=weekends,
        signins=signins,
        actions=actions,
        by_user=dict(sorted(by_user.items())),
        lines=cut("unusual", lines),
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _local(ts: float, zi: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ts, zi).strftime("%Y-%m-%d %H:%M (%a)")
