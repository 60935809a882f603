"""How directory users sign in and stay signed in: the part of :class:`kasou.control.users.Users` that asks the
directory (:mod:`kasou.control.directory`).

* A name with a local user record signs in locally, as before. A name without one, while a directory is set,
  is looked up there: the service account searches it, kasou binds as its DN with the password, gathers its
  groups (nested ones too) and maps them to a role. The first sign-in makes the user's kasou record
  (``source: directory``, no password of kasou's), so sessions, API tokens, TOTP, the lock-out count, the audit
  log and maintenance windows work as for local users; every sign-in brings its role, departments and pools up
  to date (a change is audited as ``directory_role_change``).
* A name neither kasou nor the directory knows is answered exactly as before (the same message, counted and
  locked the same way), so nothing tells which names exist.
* Sessions and API tokens of a directory user are checked against the directory again at most every
  ``KASOU_DIRECTORY_RECHECK`` seconds: a changed grant takes effect, a user gone from the directory, disabled
  or left without a mapped group is signed out (``directory_revoked``) and their tokens refused until a
  sign-in finds them allowed again. A directory that does not answer leaves sessions running until their
  normal end (the operator event ``directory_unreachable`` says so).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NoReturn

from kasou.config import directory_recheck_s
from kasou.control import audit
from kasou.control.directory import Directory, DirectoryUser
from kasou.control.ldapclient import AD_REASONS, AccountRefused
from kasou.control.user_records import USERS_PREFIX, UserRecord
from kasou.errors import DirectoryUnavailable, InvalidSpec, NotFound, StoreConflict, Unauthorized
from kasou.model.names import validate_name
from kasou.model.users import RESERVED_NAMES

if TYPE_CHECKING:
    from collections.abc import Callable

    from kasou.store.base import Store

DIRECTORY = "directory"
WRONG = "wrong user name or password"


def no_role(name: str) -> Unauthorized:
    return Unauthorized(f"no kasou role for {name!r}: none of their directory groups is mapped (an administrator "
                        "maps one: kasou directory map GROUP --role ROLE)", directory="no_role")  # fmt: skip


def _grant_of(r: UserRecord) -> dict[str, Any]:
    return {"role": r.role.value, "departments": r.departments, "pools": r.pools}


class DirectorySignIn:
    """Mixed into :class:`kasou.control.users.Users`, which provides the lock-out's charge and settlement."""

    store: Store
    directory: Directory
    _ghosts: OrderedDict[str, tuple[int, float | None]]
    _rechecking: set[str]

    # -- provided by Users ---------------------------------------------------------------------

    async def _charge(self, name: str) -> tuple[UserRecord, float | None]:
        raise NotImplementedError

    async def _settle(
        self, name: str, lock: float | None, more: Callable[[UserRecord], dict[str, object] | None]
    ) -> UserRecord:
        raise NotImplementedError

    async def _failed(self, rec: UserRecord, lock: float | None, source: str) -> None:
        raise NotImplementedError

    async def _ghost_attempt(self, name: str, password: str) -> NoReturn:
        raise NotImplementedError

    async def _update(self, name: str, change: Callable[[UserRecord], UserRecord]) -> UserRecord:
        raise NotImplementedError

    async def end_sessions(self, name: str, keep: str | None = None) -> int:
        raise NotImplementedError

    @staticmethod
    def _locked(name: str, left: float) -> Unauthorized:
        raise NotImplementedError

    # -- sign-in -------------------------------------------------------------------------------

    @staticmethod
    def _fields(u: DirectoryUser, now: float) -> dict[str, Any]:
        assert u.grant.role is not None
        return {"role": u.grant.role, "departments": u.grant.departments, "pools": u.grant.pools,
                "display_name": u.display_name, "dir_dn": u.dn, "dir_groups": u.grant.groups, "dir_checked": now,
                "dir_refused": None}  # fmt: skip

    @staticmethod
    def _allowed(name: str, u: DirectoryUser) -> None:
        if u.disabled:
            raise AccountRefused(AD_REASONS["533"], directory="refused")
        if u.grant.role is None:
            raise no_role(name)

    async def _directory_attempt(self, name: str, password: str, source: str) -> tuple[UserRecord, float | None, bool]:
        """A sign-in of a name without a local record while a directory is set: the record and the lock-out's
        charge to go on with (a directory user's) and whether the password was checked already (a first sign-in),
        or a refusal. Directory names are kept in lower case (AD's are
        without case): ``Tanaka`` is the directory user ``tanaka``, never a local user of another case."""
        lower = name.lower()
        e = await self.store.get(USERS_PREFIX + lower) if lower != name else None
        if e is not None and e.value.get("source") != DIRECTORY:  # a local user's name in another case: as before
            await self._ghost_attempt(name, password)
        first = e is None
        rec, lock = await (self._directory_first(lower, password, source) if first else self._charge(lower))
        if rec.source != DIRECTORY:  # a local user of that name was made meanwhile
            await self._failed(rec, lock, source)
            raise Unauthorized(WRONG)
        return rec, lock, first

    async def _directory_first(self, name: str, password: str, source: str) -> tuple[UserRecord, float | None]:
        """A name without a kasou record while a directory is set: the directory's user signs in (their record is
        made) and the lock-out is charged on it; a name the directory does not know, or a wrong password, is a
        ghost attempt (always raises)."""
        try:
            validate_name(name, "user")
        except InvalidSpec:
            valid = False  # (e.g. user@domain: directory users sign in with their account name)
        else:
            valid = name not in RESERVED_NAMES
        if not valid:
            await self._ghost_attempt(name, password)
        now = time.time()
        _failures, until = self._ghosts.get(name, (0, None))
        if until is not None and until > now:
            raise self._locked(name, until - now)
        try:
            u = await self.directory.authenticate(name, password)
        except AccountRefused:
            raise
        except Unauthorized:
            u = None
        if u is None:
            await self._ghost_attempt(name, password)
        self._allowed(name, u)
        self._ghosts.pop(name, None)
        rec = UserRecord.model_validate({"name": name, "password_hash": "", "source": DIRECTORY, "created_at": now,
                                         **self._fields(u, now)})  # fmt: skip
        try:
            await self.store.create(USERS_PREFIX + name, rec.model_dump(mode="json"))
        except StoreConflict:
            pass  # made meanwhile by another sign-in of the same user
        else:
            await audit.record(self.store, "directory_user", source=source, target=f"users/{name}",
                               details={"dn": u.dn, "groups": u.grant.groups, **_grant_of(rec)})  # fmt: skip
        return await self._charge(name)

    async def _directory_password(
        self, rec: UserRecord, lock: float | None, password: str, source: str
    ) -> dict[str, object]:
        """A directory user's password, checked by the directory (the attempt was charged): the changes their
        record gets (role, departments, pools, as the directory's groups give them now)."""
        try:
            u = await self.directory.authenticate(rec.name, password)
        except (DirectoryUnavailable, NotFound) as e:
            await self._settle(rec.name, lock, lambda r: {})  # not a wrong password: the charge is given back
            if isinstance(e, NotFound):
                raise DirectoryUnavailable("directory sign-in is off here: local accounts and break-glass still "
                                           "work") from None  # fmt: skip
            raise
        except AccountRefused:
            await self._failed(rec, lock, source)
            raise
        except Unauthorized:
            await self._failed(rec, lock, source)
            raise Unauthorized(WRONG) from None
        if u is None:  # gone from the directory
            await self._failed(rec, lock, source)
            await self.end_sessions(rec.name)
            raise Unauthorized(WRONG)
        try:
            self._allowed(rec.name, u)
        except Unauthorized:
            await self._failed(rec, lock, source)
            raise
        fields = self._fields(u, time.time())
        await self._audit_change(rec, fields, source, "sign-in")
        return fields

    async def _audit_change(self, rec: UserRecord, fields: dict[str, Any], source: str, when: str) -> None:
        new = {"role": fields["role"].value if hasattr(fields["role"], "value") else fields["role"],
               "departments": fields["departments"], "pools": fields["pools"]}  # fmt: skip
        old = _grant_of(rec)
        if old["role"] != new["role"] or sorted(old["departments"]) != sorted(new["departments"]) or sorted(
                old["pools"]) != sorted(new["pools"]):  # fmt: skip
            details = {"from": old, "to": new, "groups": fields["dir_groups"], "at": when}
            await audit.record(self.store, "directory_role_change", source=source, target=f"users/{rec.name}",
                               details=details)  # fmt: skip

    # -- re-checks of sessions and tokens ------------------------------------------------------

    async def _directory_recheck(self, rec: UserRecord) -> UserRecord:
        """A directory user's record, checked against the directory again if it is due; Unauthorized if the
        directory no longer allows the user (their sessions end)."""
        if rec.source != DIRECTORY:
            return rec
        due = time.time() - rec.dir_checked >= directory_recheck_s()
        if due and not self.directory.resting() and rec.name not in self._rechecking:
            self._rechecking.add(rec.name)
            try:
                rec = await self._recheck_now(rec)
            finally:
                self._rechecking.discard(rec.name)
        if rec.dir_refused is not None:
            raise Unauthorized(f"user {rec.name!r}: {rec.dir_refused}; sign in again once that is put right")
        return rec

    async def _recheck_now(self, rec: UserRecord) -> UserRecord:
        try:
            u = await self.directory.lookup(rec.name)
        except DirectoryUnavailable:
            return rec  # sessions continue until their normal end; the operator event is raised
        except NotFound:
            u, why = None, "directory sign-in was turned off"
        else:
            why = "the directory no longer has this account"
        now = time.time()
        refused: str | None = None
        if u is None:
            refused = why
        elif u.disabled:
            refused = "the directory account is disabled"
        elif u.grant.role is None:
            refused = "none of the user's directory groups is mapped to a kasou role any more"
        if refused is not None:
            new = await self._update(rec.name, lambda r: r.model_copy(update={"dir_refused": refused,
                                                                              "dir_checked": now}))  # fmt: skip
            ended = await self.end_sessions(rec.name)
            await audit.record(self.store, "directory_revoked", target=f"users/{rec.name}",
                               details={"reason": refused, "sessions_ended": ended})  # fmt: skip
            return new
        assert u is not None
        fields = self._fields(u, now)
        await self._audit_change(rec, fields, "", "re-check")
        return await self._update(rec.name, lambda r: r.model_copy(update=fields))
