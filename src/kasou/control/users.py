"""Users, their passwords (argon2id) and their sign-in sessions, kept in the store.

A session is a random token (256 bits) held in an HttpOnly, SameSite=Strict cookie; the store
keeps only its SHA-256, so a copy of the store signs no one in. A session ends after
``KASOU_SESSION_IDLE`` seconds without a request (automatic log-off, 15 minutes by default) and at
the latest ``KASOU_SESSION_MAX`` seconds after sign-in (12 hours), and when an administrator sets the
user's password or signs the user out. Five wrong passwords in a row lock the account for five minutes:
each attempt is counted before its password is checked (one compare-and-swap on the user's record), so
attempts sent all at once cannot get past the count, and a failure never shortens a lock. A name no user
has is answered and locked the same way (counted in memory), so the answers tell no one which names exist.

Also here: per-user API tokens (:mod:`kasou.control.tokens`), the optional TOTP second factor
(:mod:`kasou.control.totp`; ``KASOU_REQUIRE_TOTP_FOR=admin,operator`` makes it required for those roles,
directory users included), directory sign-in (:mod:`kasou.control.directory_signin`)
and the break-glass account (:mod:`kasou.control.breakglass`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from kasou.config import require_totp_for, session_idle_s, session_max_s
from kasou.control import audit, breakglass, sealed, totp
from kasou.control.directory import Directory
from kasou.control.directory_signin import DIRECTORY, DirectorySignIn
from kasou.control.events import ACTIVE_PREFIX, Events
from kasou.control.tokens import TokenCreated, TokenRecord, TokenView, UserTokens
from kasou.control.user_records import (
    SESSIONS_PREFIX,
    USERS_PREFIX,
    SessionRecord,
    TotpEnrolment,
    UserRecord,
    UserView,
    sid,
    view,
)
from kasou.errors import AlreadyExists, Conflict, InvalidSpec, NotFound, StoreConflict, StoreError, Unauthorized
from kasou.model.names import validate_name
from kasou.model.users import Role, UserCreate, check_departments, check_password
from kasou.store.base import Store

__all__ = ["SESSIONS_PREFIX", "USERS_PREFIX", "SessionRecord", "TotpEnrolment", "UserRecord", "UserView", "Users",
           "view"]  # fmt: skip

LOCK_AFTER = 5
LOCK_S = 300.0
TOUCH_EVERY_S = 20.0  # a session's last use is written at most this often
BREAK_GLASS_EVENTS = "break-glass/"  # under events-active/: break-glass uses not acknowledged yet

log = logging.getLogger(__name__)
BREAK_GLASS_ACTOR = audit.Actor(name=breakglass.NAME, role=Role.ADMIN.value, via="break_glass")


_hasher = PasswordHasher()
_DUMMY = _hasher.hash("kasou-dummy-password")  # verified for unknown names: the same time either way
WRONG = "wrong user name or password"
CAS_TRIES = 50  # compare-and-swap rounds on one user's record before giving up (attempts all at once)
GHOSTS_MAX = 10_000  # names no user has whose failed sign-ins are counted (in memory, the oldest forgotten)
UNKNOWN_KEY = "auth/unknown-name"  # {"last_failure": UNIX TIME}: written at each sign-in for a name no user has


def _verify(digest: str, password: str) -> bool:
    """Is ``password`` the one hashed in ``digest`` (argon2id)? False for a damaged hash too. Slow: in a thread."""
    try:
        return bool(_hasher.verify(digest, password))
    except (VerificationError, InvalidHashError):
        return False


class _Refused(Exception):
    """A settlement refused by its caller's check (a TOTP code no longer valid)."""


def _what(name: str, field: str) -> str:
    return f"the {'pending ' if field == 'totp_pending' else ''}TOTP secret of user {name!r}"


class Users(DirectorySignIn):
    def __init__(self, store: Store, secrets_key: Path | None = None) -> None:
        self.store = store
        self.sealer = sealed.Sealer(secrets_key or sealed.default_key_path(store))
        self.directory = Directory(store, self.sealer)
        self._rechecking: set[str] = set()  # directory users being re-checked now
        self.tokens = UserTokens(store)
        self.break_glass = breakglass.BreakGlass(store)
        self.events = Events(store)
        self._ghosts: OrderedDict[str, tuple[int, float | None]] = OrderedDict()  # unknown names: failures, lock

    async def get(self, name: str) -> UserRecord:
        return (await self._entry(name))[0]

    async def _entry(self, name: str) -> tuple[UserRecord, int]:
        validate_name(name, "user")
        e = await self.store.get(USERS_PREFIX + name)
        if e is None:
            raise NotFound(f"no user named {name!r}")
        return UserRecord.model_validate(e.value), e.mod_rev

    async def list_all(self) -> list[UserView]:
        return [view(UserRecord.model_validate(e.value)) for e in await self.store.range(USERS_PREFIX)]

    async def create(self, spec: UserCreate) -> UserView:
        digest = await asyncio.to_thread(_hasher.hash, spec.password)
        rec = UserRecord(name=spec.name, role=spec.role, display_name=spec.display_name, password_hash=digest,
                         pools=spec.pools, departments=spec.departments)  # fmt: skip
        try:
            await self.store.create(USERS_PREFIX + spec.name, rec.model_dump(mode="json"))
        except StoreConflict:
            raise AlreadyExists(f"a user named {spec.name!r} already exists") from None
        return view(rec)

    async def delete(self, name: str) -> None:
        await self.get(name)
        await self.store.delete(USERS_PREFIX + name)
        for e in await self.store.range(SESSIONS_PREFIX):
            if e.value.get("user") == name:
                await self.store.delete(e.key)
        await self.tokens.revoke_all(name)  # they stop working with the user anyway

    async def set_password(self, name: str, password: str) -> int:
        """An administrator sets a user's password: the account is unlocked and every session of the user ends
        (someone who had the old password is shut out). The number of sessions ended."""
        check_password(password)
        if (await self.get(name)).source == DIRECTORY:
            raise Conflict(f"user {name!r} signs in with the directory's password: the hospital's directory sets it")
        digest = await asyncio.to_thread(_hasher.hash, password)
        await self._update(name, lambda r: r.model_copy(update={"password_hash": digest, "failures": 0,
                                                                "locked_until": None}))  # fmt: skip
        return await self.end_sessions(name)

    async def signout(self, name: str) -> int:
        """An administrator ends every session of ``name`` (the break-glass account's too). How many ended."""
        if name != breakglass.NAME:
            await self.get(name)
        return await self.end_sessions(name)

    async def end_sessions(self, name: str, keep: str | None = None) -> int:
        """End the sessions of user ``name`` but the one of token ``keep``; how many ended. A desktop of an ended
        session goes back to its pool at the pool's next round, a console closes at its next check."""
        kept = sid(keep) if keep is not None else None
        ended = 0
        for e in await self.store.range(SESSIONS_PREFIX):
            mine = e.value.get("user") == name and e.key.removeprefix(SESSIONS_PREFIX) != kept
            if mine and await self.store.delete(e.key):
                ended += 1
        return ended

    async def change_own_password(self, name: str, current: str, password: str, keep: str | None = None,
                                  source: str = "") -> int:  # fmt: skip
        """A user changes their password, giving the current one (a wrong one counts toward the lock-out).

        The user's other sessions end (a session someone else holds is shut out); ``keep`` is the session
        the change came from. The number of sessions ended."""
        if (await self.get(name)).source == DIRECTORY:
            raise Conflict("your password is the directory's: change it there (e.g. on a hospital PC)")
        await self._recheck(name, current, source)
        check_password(password)
        if password == current:
            raise InvalidSpec("the new password is the same as the current one", field="password")
        digest = await asyncio.to_thread(_hasher.hash, password)
        rec, rev = await self._entry(name)
        await self._put(rec.model_copy(update={"password_hash": digest, "failures": 0, "locked_until": None}), rev)
        return await self.end_sessions(name, keep)

    async def _recheck(self, name: str, password: str, source: str) -> None:
        """A signed-in user proves they are at the keyboard with their password before changing a credential."""
        wrong = Unauthorized("the current password is wrong")
        if not isinstance(password, str) or len(password) > 1024:
            raise wrong
        rec, lock = await self._charge(name)
        if rec.source == DIRECTORY:
            await self._settle(name, lock, lambda r: {})  # the directory's own lock-out counts its failures
            u = await self.directory.authenticate(name, password)
            if u is None:
                raise wrong
            return
        if not await asyncio.to_thread(_verify, rec.password_hash, password):
            await self._failed(rec, lock, source)
            raise wrong
        await self._settle(name, lock, lambda r: {})

    # -- the lock-out ---------------------------------------------------------------------
    #
    # An attempt is counted as failed *before* its password is checked (the charge: one compare-and-swap on
    # the user's record, which also refuses a locked user), and the count is given back once it succeeds (the
    # settlement). So attempts sent all at once are each counted, the one that reaches LOCK_AFTER locks the
    # account for every later one, and no more than LOCK_AFTER passwords are ever checked in a row. A lock is
    # only ever set by a charge and cleared by a right password's settlement, or by an administrator; a
    # failure never writes over a lock (it was counted when charged).

    @staticmethod
    def _locked(name: str, left: float) -> Unauthorized:
        return Unauthorized(f"user {name!r} is locked after {LOCK_AFTER} failed sign-ins; try again in {left:.0f} s")

    async def _charge(self, name: str) -> tuple[UserRecord, float | None]:
        """Count one attempt of ``name`` as failed, refusing a locked user: the record as it was, and the lock this
        charge set (None if it set none). NotFound for no such user."""
        for _ in range(CAS_TRIES):
            rec, rev = await self._entry(name)
            now = time.time()
            if rec.locked_until is not None and rec.locked_until > now:
                raise self._locked(rec.name, rec.locked_until - now)
            failures = rec.failures + 1
            lock = now + LOCK_S if failures >= LOCK_AFTER else None
            counted = rec.model_copy(update={"failures": 0 if lock else failures, "locked_until": lock})
            try:
                await self.store.put(USERS_PREFIX + rec.name, counted.model_dump(mode="json"), expect_rev=rev)
            except StoreConflict:
                continue
            return rec, lock
        raise Unauthorized(f"too many sign-ins of user {name!r} at the same time: try again")

    async def _settle(
        self, name: str, lock: float | None, more: Callable[[UserRecord], dict[str, object] | None]
    ) -> UserRecord:
        """A right password: the failures counted end (and the lock this attempt's own charge set, if any; a lock
        another attempt set stays). ``more(record)`` adds changes, or returns None to refuse the attempt after
        all (it then stays counted as failed): Unauthorized. The record written."""
        for _ in range(CAS_TRIES):
            rec, rev = await self._entry(name)
            extra = more(rec)
            if extra is None:
                raise _Refused
            update: dict[str, object] = dict(extra)
            ours = lock is not None and rec.locked_until == lock  # the lock this attempt's own charge set
            if ours or rec.locked_until is None or rec.locked_until <= time.time():
                update.update(failures=0, locked_until=None)
            new = rec.model_copy(update=update)
            try:
                await self.store.put(USERS_PREFIX + name, new.model_dump(mode="json"), expect_rev=rev)
            except StoreConflict:
                continue
            return new
        raise Unauthorized(f"too many sign-ins of user {name!r} at the same time: try again")

    async def _failed(self, rec: UserRecord, lock: float | None, source: str) -> None:
        """An attempt failed (it was counted when charged); the one whose charge locked the account is audited."""
        if lock is not None:
            await audit.record(self.store, "lockout", source=source, target=f"users/{rec.name}", details={
                "failures": LOCK_AFTER, "locked_s": LOCK_S})  # fmt: skip

    async def _ghost_attempt(self, name: str, password: str) -> NoReturn:
        """An attempt for a name no user has: answered as a real user's wrong password would be, lock included,
        and after as long (the password is checked against a dummy hash). Always raises Unauthorized."""
        now = time.time()
        failures, until = self._ghosts.pop(name, (0, None))
        if until is not None and until > now:
            self._ghosts[name] = (failures, until)
            raise self._locked(name, until - now)
        failures += 1
        lock = now + LOCK_S if failures >= LOCK_AFTER else None
        self._ghosts[name] = (0 if lock else failures, lock)
        while len(self._ghosts) > GHOSTS_MAX:
            self._ghosts.popitem(last=False)
        # As a real user's attempt writes its count: one write (of one key, whatever the name), then the hash.
        with contextlib.suppress(StoreError):
            await self.store.put(UNKNOWN_KEY, {"last_failure": now})
        await asyncio.to_thread(_verify, _DUMMY, password)
        raise Unauthorized(WRONG)

    async def set_pools(self, name: str, pools: list[str]) -> UserView:
        for p in pools:
            validate_name(p, "pool")
        self._not_directory(await self.get(name), "desktop pools")
        return view(await self._update(name, lambda r: r.model_copy(update={"pools": pools})))

    async def set_departments(self, name: str, departments: list[str]) -> UserView:
        rec = await self.get(name)
        self._not_directory(rec, "departments")
        check_departments(rec.role, departments)
        return view(await self._update(name, lambda r: r.model_copy(update={"departments": departments})))

    @staticmethod
    def _not_directory(rec: UserRecord, what: str) -> None:
        if rec.source == DIRECTORY:
            raise Conflict(f"user {rec.name!r} gets their {what} from their directory groups at each sign-in: map "
                           "a group instead (kasou directory map GROUP ...)")  # fmt: skip

    # -- sign-in --------------------------------------------------------------------------

    async def login(
        self, name: str, password: str, source: str = "", code: str | None = None
    ) -> tuple[str, UserRecord]:
        """Check the password (and the TOTP code of a user who has one); a new session token and the user.

        A wrong name or password is one message, and a name no user has locks like a real one (no telling
        which names exist); a missing or wrong TOTP code counts toward the lock-out like a wrong password,
        and its refusal carries ``details.totp = "required"`` (``"enroll"`` for a user without TOTP whose
        role ``KASOU_REQUIRE_TOTP_FOR`` names). A name without a local record is asked of the directory, if one
        is set (:mod:`kasou.control.directory_signin`).
        """
        wrong = Unauthorized(WRONG)
        if not isinstance(name, str) or not isinstance(password, str) or len(password) > 1024:
            raise wrong
        if name == breakglass.NAME:
            return await self._login_break_glass(password, source)
        checked = False  # the password checked already (a directory user's first sign-in)
        try:
            rec, lock = await self._charge(name)
        except (NotFound, InvalidSpec):
            if not await self.directory.enabled():
                await self._ghost_attempt(name, password)
            rec, lock, checked = await self._directory_attempt(name, password, source)
            name = rec.name
        extra: dict[str, object] = {}
        if checked:
            pass
        elif rec.source == DIRECTORY:
            extra = await self._directory_password(rec, lock, password, source)
        elif not await asyncio.to_thread(_verify, rec.password_hash, password):
            await self._failed(rec, lock, source)
            raise wrong
        now = time.time()
        if rec.totp_secret is not None:
            secret = await asyncio.to_thread(self._open, rec, "totp_secret")

            def accept(r: UserRecord) -> dict[str, object] | None:
                """The code's step, if it is later than the last one accepted (checked on the record as it is
                now: two sign-ins with one code cannot both pass)."""
                step = totp.match(secret, code, r.totp_last_step, now)
                if step is None or r.totp_secret is None:
                    return None
                update: dict[str, object] = {**extra, "totp_last_step": step}
                if not sealed.Sealer.is_sealed(r.totp_secret):  # written before sealing: sealed now
                    update["totp_secret"] = self._seal(name, "totp_secret", secret)
                return update

            try:
                rec = await self._settle(name, lock, accept)
            except _Refused:
                await self._failed(rec, lock, source)
                if not code:
                    raise Unauthorized("a TOTP code is needed: enter the code of your authenticator",
                                       totp="required") from None  # fmt: skip
                raise Unauthorized("the TOTP code is wrong or was used already", totp="required") from None
        else:
            rec = await self._settle(name, lock, lambda r: extra)
            if rec.role.value in require_totp_for():
                raise Unauthorized(f"{rec.role.value} users sign in with a TOTP code here and user {name!r} has "
                                   f"none: an administrator enrolls it (kasou user totp enroll {name})",
                                   totp="enroll")  # fmt: skip
        token = secrets.token_urlsafe(32)
        sess = SessionRecord(user=name, created_at=now, last_used=now, source=source[:100])
        await self.store.put(SESSIONS_PREFIX + sid(token), sess.model_dump(mode="json"))
        return token, rec

    # -- the break-glass account ----------------------------------------------------------

    @staticmethod
    def _break_glass_user() -> UserRecord:
        return UserRecord(name=breakglass.NAME, role=Role.ADMIN, display_name="break-glass (emergency)",
                          password_hash="", break_glass=True)  # fmt: skip

    async def _login_break_glass(self, password: str, source: str) -> tuple[str, UserRecord]:
        bg = await self.break_glass.check(password)
        where = source or "an unknown address"
        # Flagged before the session exists: a use that could not be flagged gets no session.
        log.critical("BREAK-GLASS sign-in from %s: every action of this session is audited", where)
        await audit.record(self.store, "break_glass_login", actor=BREAK_GLASS_ACTOR, source=source,
                           target=f"users/{breakglass.NAME}", details={"break_glass": True})  # fmt: skip
        await self.events.raise_once(
            f"{BREAK_GLASS_EVENTS}{time.time_ns():020d}", "break_glass_login", f"user/{breakglass.NAME}",
            f"the break-glass account signed in from {where}: find out why, then an administrator "
            "acknowledges it (kasou user break-glass-ack)", severity="error",
        )  # fmt: skip
        now = time.time()
        token = secrets.token_urlsafe(32)
        sess = SessionRecord(user=breakglass.NAME, created_at=now, last_used=now, source=source[:100],
                             break_glass=bg.id)  # fmt: skip
        await self.store.put(SESSIONS_PREFIX + sid(token), sess.model_dump(mode="json"))
        return token, self._break_glass_user()

    async def acknowledge_break_glass(self, by: str) -> int:
        """An administrator has looked into the break-glass uses: their events end. How many there were."""
        n = 0
        for e in await self.store.range(ACTIVE_PREFIX + BREAK_GLASS_EVENTS):
            key = e.key.removeprefix(ACTIVE_PREFIX)
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(e.value.get("time", 0))))
            said = f"break-glass use of {when} acknowledged by {by}"
            if await self.events.clear(key, "break_glass_acknowledged", said):
                n += 1
        return n

    # -- API tokens -----------------------------------------------------------------------

    async def create_token(self, name: str, label: str = "", expires_days: int | None = None) -> TokenCreated:
        await self.get(name)
        return await self.tokens.create(name, label, expires_days)

    async def list_tokens(self, name: str) -> list[TokenView]:
        await self.get(name)
        return await self.tokens.list(name)

    async def revoke_token(self, name: str, tid: str) -> TokenView:
        await self.get(name)
        return await self.tokens.revoke(name, tid)

    async def token_user(self, token: str) -> tuple[UserRecord, TokenRecord]:
        """The user a token acts for; Unauthorized if it is unknown, expired, or its user is gone or locked."""
        t = await self.tokens.check(token)
        try:
            rec = await self.get(t.user)
        except NotFound:
            raise Unauthorized(f"the API token {t.id}'s user {t.user!r} no longer exists") from None
        if rec.created_at > t.created_at:  # a user of the same name made again: not the token's user
            raise Unauthorized(f"the API token {t.id}'s user {t.user!r} no longer exists")
        if rec.locked_until is not None and rec.locked_until > time.time():
            raise Unauthorized(f"user {t.user!r} is locked after {LOCK_AFTER} failed sign-ins; its API tokens "
                               "work again once it is unlocked")  # fmt: skip
        return await self._directory_recheck(rec), t

    # -- TOTP -----------------------------------------------------------------------------

    def _seal(self, name: str, field: str, secret: str) -> str:
        return self.sealer.seal(secret, _what(name, field))

    def _open(self, rec: UserRecord, field: str) -> str:
        value = getattr(rec, field)
        assert value is not None
        return self.sealer.open(value, _what(rec.name, field))

    async def _update(self, name: str, change: Callable[[UserRecord], UserRecord]) -> UserRecord:
        """Change user ``name``'s record with compare-and-swap (a concurrent sign-in's count is never written
        over); the record written."""
        for _ in range(CAS_TRIES):
            rec, rev = await self._entry(name)
            new = change(rec)
            try:
                await self.store.put(USERS_PREFIX + name, new.model_dump(mode="json"), expect_rev=rev)
            except StoreConflict:
                continue
            return new
        raise Conflict(f"user {name!r} changed meanwhile: try again")

    async def _put(self, rec: UserRecord, rev: int) -> None:
        try:
            await self.store.put(USERS_PREFIX + rec.name, rec.model_dump(mode="json"), expect_rev=rev)
        except StoreConflict:
            raise Conflict(f"user {rec.name!r} changed meanwhile: try again") from None

    async def totp_enroll(self, name: str) -> TotpEnrolment:
        """A new TOTP secret for ``name``, shown this once; it is used once confirmed with a code."""
        rec, rev = await self._entry(name)
        if rec.totp_secret is not None:
            raise Conflict(f"user {name!r} has TOTP on already; for a new device: kasou user totp disable {name}, "
                           "then enroll again")  # fmt: skip
        secret = totp.new_secret()
        pending = await asyncio.to_thread(self._seal, name, "totp_pending", secret)
        await self._put(rec.model_copy(update={"totp_pending": pending}), rev)
        return TotpEnrolment(secret=secret, uri=totp.uri(secret, name))

    async def totp_enroll_own(self, name: str, password: str, source: str = "") -> TotpEnrolment:
        """A user sets up their own second factor (the password again first); confirmed as an administrator's."""
        await self._recheck(name, password, source)
        return await self.totp_enroll(name)

    async def totp_confirm(self, name: str, code: str) -> UserView:
        """Turn TOTP on with a code from the enrolled device: from now on signing in needs a code."""
        rec, rev = await self._entry(name)
        if rec.totp_secret is not None:
            raise Conflict(f"user {name!r} has TOTP on already")
        if rec.totp_pending is None:
            raise Conflict(f"user {name!r} has no TOTP enrolment to confirm: kasou user totp enroll {name}")
        secret = await asyncio.to_thread(self._open, rec, "totp_pending")
        step = totp.match(secret, code, 0)
        if step is None:
            raise InvalidSpec("the TOTP code is not right (is the device's clock right?)", field="code")
        kept = self._seal(name, "totp_secret", secret)
        rec = rec.model_copy(update={"totp_secret": kept, "totp_pending": None, "totp_last_step": step})
        await self._put(rec, rev)
        return view(rec)

    async def totp_disable(self, name: str) -> UserView:
        """Turn TOTP off (a lost device): the user signs in with the password alone until enrolled again."""
        rec, rev = await self._entry(name)
        if rec.totp_secret is None and rec.totp_pending is None:
            raise Conflict(f"user {name!r} has no TOTP")
        rec = rec.model_copy(update={"totp_secret": None, "totp_pending": None})
        await self._put(rec, rev)
        return view(rec)

    async def session_user(self, token: str) -> UserRecord:
        """The user of a live session (and the session's last use noted); Unauthorized if it ended."""
        key = SESSIONS_PREFIX + sid(token)
        e = await self.store.get(key)
        if e is None:
            raise Unauthorized("not signed in (or the session ended): sign in again")
        sess = SessionRecord.model_validate(e.value)
        now = time.time()
        if now - sess.last_used > session_idle_s() or now - sess.created_at > session_max_s():
            await self.store.delete(key)
            raise Unauthorized("the session ended after a time without use: sign in again")
        if sess.break_glass is not None and self.break_glass.current_id() != sess.break_glass:
            await self.store.delete(key)
            raise Unauthorized("the break-glass password was replaced: this session has ended")
        if now - sess.last_used > TOUCH_EVERY_S:
            await self.store.put(key, sess.model_copy(update={"last_used": now}).model_dump(mode="json"))
        if sess.break_glass is not None:
            return self._break_glass_user()
        try:
            rec = await self.get(sess.user)
        except NotFound:
            await self.store.delete(key)
            raise Unauthorized("this user no longer exists") from None
        return await self._directory_recheck(rec)

    async def session_of(self, token: str) -> SessionRecord | None:
        e = await self.store.get(SESSIONS_PREFIX + sid(token))
        return SessionRecord.model_validate(e.value) if e is not None else None

    async def logout(self, token: str) -> SessionRecord | None:
        key = SESSIONS_PREFIX + sid(token)
        e = await self.store.get(key)
        await self.store.delete(key)
        return SessionRecord.model_validate(e.value) if e is not None else None

    async def expired_sessions(self) -> list[tuple[str, SessionRecord]]:
        """Sessions past their idle time or maximum age (for the portal to return their desktops)."""
        now = time.time()
        out = []
        for e in await self.store.range(SESSIONS_PREFIX):
            s = SessionRecord.model_validate(e.value)
            if now - s.last_used > session_idle_s() or now - s.created_at > session_max_s():
                out.append((e.key.removeprefix(SESSIONS_PREFIX), s))
        return out

    async def drop_session(self, sid: str) -> None:
        await self.store.delete(SESSIONS_PREFIX + sid)

    async def live_sessions(self, user: str) -> list[str]:
        """The session ids of a user that have not ended."""
        now = time.time()
        out = []
        for e in await self.store.range(SESSIONS_PREFIX):
            s = SessionRecord.model_validate(e.value)
            if s.user == user and now - s.last_used <= session_idle_s() and now - s.created_at <= session_max_s():
                out.append(e.key.removeprefix(SESSIONS_PREFIX))
        return out
