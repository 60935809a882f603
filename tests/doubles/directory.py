"""A directory in memory that answers as Active Directory does (:class:`kasou.control.ldapclient.DirectoryServer`).

The functional tests sign directory users in through it; ``tests/contract/test_directory_contract.py`` runs the
same tests against it, Samba AD and OpenLDAP, so it cannot drift from them. Like AD, it refuses a disabled,
expired or locked account only when the password is right (AD's ``data 533/532/775``), and finds nested groups.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kasou.control.ldapclient import AD_REASONS, WRONG, AccountRefused, Entry, Settings
from kasou.errors import DirectoryUnavailable, Unauthorized
from kasou.model.directory import Group

SERVICE_DN = "CN=kasou-svc,CN=Users,DC=kasou,DC=test"
SERVICE_PASSWORD = "Svc-Passw0rd-1"
BASE_DN = "DC=kasou,DC=test"
URL = "ldaps://fake-dc.kasou.test"


@dataclass
class FakeUser:
    name: str
    password: str
    display_name: str = ""
    disabled: bool = False
    state: str = ""  # "", "expired", "must_change", "locked"

    @property
    def dn(self) -> str:
        return f"CN={self.name},CN=Users,{BASE_DN}"


@dataclass
class FakeTree:
    """What the fake directory holds, shared by every client made of it (each call its own, as ldap3's)."""

    users: dict[str, FakeUser] = field(default_factory=dict)
    groups: dict[str, set[str]] = field(default_factory=dict)  # group CN -> member DNs (users' or groups')
    reachable: bool = True
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_user(self, name: str, password: str, *groups: str, **kw: object) -> FakeUser:
        u = FakeUser(name, password, **kw)  # type: ignore[arg-type]
        self.users[name.lower()] = u
        for g in groups:
            self.add_member(g, u.dn)
        return u

    def add_member(self, group: str, member_dn: str) -> None:
        self.groups.setdefault(group, set()).add(member_dn)

    def remove_member(self, group: str, member_dn: str) -> None:
        self.groups.get(group, set()).discard(member_dn)

    @staticmethod
    def group_dn(cn: str) -> str:
        return f"CN={cn},CN=Users,{BASE_DN}"

    def settings(self, **kw: object) -> Settings:
        base: dict[str, object] = {"urls": (URL,), "base_dn": BASE_DN, "bind_user": SERVICE_DN, "bind_password": SERVICE_PASSWORD,
                "ca_pem": None, "user_filter": "(&(objectClass=user)(sAMAccountName={name}))", "starttls": False,
                "timeout_s": 2.0}  # fmt: skip
        base.update(kw)
        return Settings(**base)  # type: ignore[arg-type]

    def client(self, settings: Settings) -> FakeDirectory:
        return FakeDirectory(self, settings)


class FakeDirectory:
    def __init__(self, tree: FakeTree, settings: Settings) -> None:
        self.tree = tree
        self.s = settings
        self._answered = ""

    @property
    def answered(self) -> str:
        return self._answered

    def _reach(self) -> None:
        with self.tree.lock:
            self.tree.calls += 1
        if not self.tree.reachable or self.s.urls[0] != URL:
            raise DirectoryUnavailable(f"the directory cannot be reached: {self.s.urls[0]}: connection refused")
        self._answered = URL

    def _service(self) -> None:
        self._reach()
        if (self.s.bind_user, self.s.bind_password) != (SERVICE_DN, SERVICE_PASSWORD):
            raise DirectoryUnavailable(f"{URL} refused kasou's service account {self.s.bind_user!r}")

    def ping(self) -> None:
        self._service()

    def close(self) -> None:
        pass

    def find_user(self, name: str) -> Entry | None:
        self._service()
        u = self.tree.users.get(name.lower())
        return None if u is None else Entry(dn=u.dn, display_name=u.display_name or u.name, disabled=u.disabled)

    def check_password(self, dn: str, password: str) -> None:
        self._reach()
        u = next((u for u in self.tree.users.values() if u.dn.lower() == dn.lower()), None)
        if u is None or not password or password != u.password:
            raise Unauthorized(WRONG)
        code = "533" if u.disabled else {"expired": "532", "must_change": "773", "locked": "775"}.get(u.state)
        if code is not None:
            raise AccountRefused(AD_REASONS[code], directory="refused")

    def groups(self, dn: str) -> list[Group]:
        self._service()
        found: dict[str, Group] = {}
        frontier = {dn.lower()}
        seen = set(frontier)
        while frontier:
            nxt = set()
            for cn, members in self.tree.groups.items():
                gdn = self.tree.group_dn(cn)
                if gdn.lower() not in seen and frontier & {m.lower() for m in members}:
                    found[gdn.lower()] = Group(dn=gdn, name=cn)
                    seen.add(gdn.lower())
                    nxt.add(gdn.lower())
            frontier = nxt
        return sorted(found.values(), key=lambda g: g.dn.lower())
