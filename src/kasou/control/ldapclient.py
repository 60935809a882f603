"""The LDAP client of directory sign-in (ldap3): Active Directory and OpenLDAP, LDAPS or StartTLS only.

Every call is synchronous and bounded (connect and each answer: ``timeout_s``); the control plane runs it in
a thread (:mod:`kasou.control.directory`), which makes one client per question and closes it after: a client
keeps its service account's connection for that question only (the user's search and their groups on one TLS
session), so no connection is ever shared between threads. The certificate is always verified (``ssl.CERT_REQUIRED``
against the CA given, or the system's) and its name checked against the URL's host; a simple bind is never
sent before TLS is up.

What the control plane needs is :class:`DirectoryServer`; the functional tests use a double of it
(``tests/doubles/directory.py``) that passes the same contract tests (``tests/contract/test_directory_contract.py``)
as this client does against Samba AD and OpenLDAP.
"""

from __future__ import annotations

import contextlib
import math
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from ldap3 import BASE, NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars

from kasou.errors import DirectoryUnavailable, Unauthorized
from kasou.model.directory import Group

NEST_DEPTH = 8  # nested groups followed this deep
GROUPS_MAX = 1000  # groups gathered at most for one user
BATCH = 20  # DNs asked for in one search of groups
ACCOUNT_DISABLE = 0x2  # userAccountControl's bit: the AD account is disabled

#: Active Directory's bind answers (``data NNN`` in the message): why a right password was refused.
AD_REASONS = {
    "533": "the directory account is disabled: the hospital's IT service enables it",
    "532": "the directory password has expired: change it (e.g. on a hospital PC), then sign in again",
    "773": "the directory password must be changed before first use: change it (e.g. on a hospital PC), then sign "
    "in again",
    "775": "the directory account is locked: the hospital's IT service unlocks it, or wait",
    "701": "the directory account has expired: the hospital's IT service extends it",
    "530": "the directory account may not sign in at this time of day",
    "531": "the directory account may not sign in from this computer",
}
WRONG = "wrong user name or password"


class AccountRefused(Unauthorized):
    """The password was right but the directory refuses the account (disabled, expired, locked)."""


@dataclass(frozen=True)
class Settings:
    urls: tuple[str, ...]
    base_dn: str
    bind_user: str
    bind_password: str = field(repr=False)
    ca_pem: str | None = None
    user_filter: str = ""
    starttls: bool = False
    timeout_s: float = 5.0


@dataclass(frozen=True)
class Entry:
    """A directory user: their DN, name to show, and whether AD says the account is disabled."""

    dn: str
    display_name: str = ""
    disabled: bool = False


class DirectoryServer(Protocol):
    """What the control plane asks a directory; each call raises DirectoryUnavailable if none answers."""

    @property
    def answered(self) -> str:
        """The URL that answered last ("" before any)."""
        ...

    def ping(self) -> None:
        """Bind as the service account (a wrong service password is DirectoryUnavailable too)."""

    def close(self) -> None:
        """End the connections this client keeps (after each use: the control plane makes one per question)."""

    def find_user(self, name: str) -> Entry | None:
        """The user of that sign-in name (the service account searching), or None."""

    def check_password(self, dn: str, password: str) -> None:
        """Bind as ``dn``: Unauthorized(WRONG) for a wrong password, AccountRefused for a refused account."""

    def groups(self, dn: str) -> list[Group]:
        """The groups ``dn`` is in, nested ones included (AD groups and groupOfNames alike)."""


def ad_reason(message: str) -> str | None:
    """Why AD refused a bind, from its message (``... AcceptSecurityContext error, data 533, v4563``)."""
    m = re.search(r"\bdata ([0-9a-fA-F]{3})\b", message or "")
    return AD_REASONS.get(m.group(1).lower()) if m else None


class LdapDirectory:
    """:class:`DirectoryServer` over ldap3."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._answered = ""
        self._svc: Connection | None = None  # the service account's connection, kept for this client's calls

    def close(self) -> None:
        if self._svc is not None:
            with contextlib.suppress(LDAPException, OSError):
                self._svc.unbind()
            self._svc = None

    @property
    def answered(self) -> str:
        return self._answered

    def _server(self, url: str) -> Server:
        parts = urlsplit(url)
        host = parts.hostname or ""
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_data=self.s.ca_pem or None, sni=host)
        use_ssl = parts.scheme == "ldaps"
        if not use_ssl and not self.s.starttls:  # checked when set; kept here so no code path can send it plain
            raise DirectoryUnavailable(f"{url}: plain ldap:// without StartTLS is never used")
        port = parts.port or (636 if use_ssl else 389)
        return Server(host, port=port, use_ssl=use_ssl, tls=tls, get_info=NONE, connect_timeout=self.s.timeout_s)

    def _connect(self, user: str | None, password: str | None) -> tuple[Connection, str]:
        """An open, secured connection bound as ``user`` (service account when None) to the first URL that
        answers; its bind's outcome is the caller's (``conn.bound``)."""
        why: list[str] = []
        for url in self.s.urls:
            try:
                conn = Connection(self._server(url), user=user, password=password, auto_bind=False,
                                  receive_timeout=max(1, math.ceil(self.s.timeout_s)), raise_exceptions=False,
                                  read_only=True, auto_referrals=False)  # fmt: skip
                conn.open()
                if not conn.server.ssl and not conn.start_tls():
                    conn.unbind()
                    raise LDAPStartTLSError(f"StartTLS refused: {conn.result.get('description', '')}")
                conn.bind()
            except (LDAPException, OSError, ssl.SSLError) as e:
                why.append(f"{url}: {_one_line(e)}")
                continue
            self._answered = url
            return conn, url
        raise DirectoryUnavailable("the directory cannot be reached: " + "; ".join(why))

    def _service(self) -> Connection:
        """The service account's bound connection (one per client: a search, then the groups, on one TLS session)."""
        if self._svc is not None and not self._svc.closed:
            return self._svc
        conn, url = self._connect(self.s.bind_user, self.s.bind_password)
        if not conn.bound:
            msg = conn.result.get("message", "") or conn.result.get("description", "")
            conn.unbind()
            raise DirectoryUnavailable(f"{url} refused kasou's service account {self.s.bind_user!r} ({msg.strip()}): "
                                       "set its password again (kasou directory set)")  # fmt: skip
        self._svc = conn
        return conn

    def ping(self) -> None:
        self._service()

    def find_user(self, name: str) -> Entry | None:
        flt = self.s.user_filter.replace("{name}", escape_filter_chars(name))
        conn = self._service()
        try:
            ok = conn.search(self.s.base_dn, flt, SUBTREE, attributes=["displayName", "cn", "userAccountControl"],
                             size_limit=2, time_limit=int(self.s.timeout_s) + 1)  # fmt: skip
            _raise_unless(conn, ok, "searching the user")
            found = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        except (LDAPException, OSError) as e:
            self.close()
            raise DirectoryUnavailable(f"the directory failed searching a user: {_one_line(e)}") from None
        if len(found) != 1:
            return None  # none, or two users of one name (the filter is not unique): no one signs in
        attrs = found[0].get("attributes") or {}
        uac = str(_first(attrs.get("userAccountControl")) or "0")
        disabled = uac.isdigit() and bool(int(uac) & ACCOUNT_DISABLE)
        shown = _first(attrs.get("displayName")) or _first(attrs.get("cn")) or ""
        return Entry(dn=str(found[0]["dn"]), display_name=str(shown)[:200], disabled=disabled)

    def check_password(self, dn: str, password: str) -> None:
        if not password:
            raise Unauthorized(WRONG)  # an empty password is an "unauthenticated bind": it would succeed
        conn, _url = self._connect(dn, password)
        try:
            if conn.bound:
                return
            msg = str(conn.result.get("message", ""))
            reason = ad_reason(msg)
            if reason is not None:
                raise AccountRefused(reason, directory="refused")
            if conn.result.get("result") == 49:  # invalidCredentials
                raise Unauthorized(WRONG)
            if conn.result.get("result") in (50, 53):  # insufficientAccessRights, unwillingToPerform
                raise AccountRefused(f"the directory refused the account: {msg.strip() or 'unwilling'}")
            raise DirectoryUnavailable(f"the directory answered the bind with {conn.result.get('description')}")
        finally:
            conn.unbind()

    def groups(self, dn: str) -> list[Group]:
        conn = self._service()
        try:
            return self._nested(conn, dn)
        except (LDAPException, OSError) as e:
            self.close()
            raise DirectoryUnavailable(f"the directory failed listing groups: {_one_line(e)}") from None

    def _nested(self, conn: Connection, dn: str) -> list[Group]:
        seen: dict[str, Group] = {}
        visited = {dn.lower()}
        frontier = [dn]
        for _depth in range(NEST_DEPTH):
            if not frontier or len(seen) >= GROUPS_MAX:
                break
            found: list[str] = []
            for i in range(0, len(frontier), BATCH):
                members = "".join(f"(member={escape_filter_chars(d)})(uniqueMember={escape_filter_chars(d)})"
                                  for d in frontier[i:i + BATCH])  # fmt: skip
                flt = ("(&(|(objectClass=group)(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
                       f"(|{members}))")  # fmt: skip
                ok = conn.search(self.s.base_dn, flt, SUBTREE, attributes=["cn"], size_limit=GROUPS_MAX,
                                 time_limit=int(self.s.timeout_s) + 1)  # fmt: skip
                _raise_unless(conn, ok, "listing groups")
                for e in conn.response or []:
                    if e.get("type") != "searchResEntry":
                        continue
                    gdn = str(e["dn"])
                    if gdn.lower() in visited:
                        continue
                    visited.add(gdn.lower())
                    cn = _first((e.get("attributes") or {}).get("cn")) or gdn.split(",", 1)[0].partition("=")[2]
                    seen[gdn.lower()] = Group(dn=gdn, name=str(cn))
                    found.append(gdn)
            frontier = found
        return sorted(seen.values(), key=lambda g: g.dn.lower())

    def read(self, dn: str) -> dict[str, Any]:
        """One entry's attributes (a diagnostic for ``directory test``)."""
        conn = self._service()
        conn.search(dn, "(objectClass=*)", BASE, attributes=["*"], size_limit=1)
        return dict(conn.response[0].get("attributes") or {}) if conn.response else {}


def _raise_unless(conn: Connection, ok: bool, doing: str) -> None:
    """A search that failed for another reason than "no such object" (e.g. a time limit) is the directory's."""
    code = conn.result.get("result") if conn.result else None
    if not ok and code not in (0, 4, 32):  # success, sizeLimitExceeded (more than asked), noSuchObject
        raise DirectoryUnavailable(f"the directory failed {doing}: {conn.result.get('description')} "
                                   f"{conn.result.get('message', '')}".strip())  # fmt: skip


def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return "its TLS certificate is not trusted (is --ca the directory's CA?): " + text[:200]
    return text[:300]


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and how long it took (ms)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1000
