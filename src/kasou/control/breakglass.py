"""The break-glass (emergency) account: signs in when the normal path fails (every administrator
locked out, a TOTP device lost, the users in the store damaged).

Its password's argon2id hash is kept in a file of its own, readable by root only (mode 0600):
``$KASOU_HOME/break-glass.json`` (beside the SQLite store, as the audit key), or wherever
``KASOU_BREAK_GLASS_FILE`` says; never in the store, so it does not depend on the users there.
``kasou user break-glass`` (``POST /v1/users/break-glass``, with the root API token only) makes or
replaces it and shows the new password once; replacing it ends the sessions signed in with the old one.

Signing in as ``break-glass`` needs no TOTP code and is never locked out, but it is rate-limited: after
``LIMIT_AFTER`` wrong passwords in a row, one attempt every ``LIMIT_WAIT_S`` seconds. The count is kept
in the store (``LIMIT_KEY``), so neither a restart nor a change of leader starts it afresh; each attempt
is counted there before its password is checked (compare-and-swap), so attempts sent at once cannot get
past it; when the store cannot be read or written the server's memory keeps it. Every use is loud:
an audit record ``break_glass_login`` (``details.break_glass: true``), an operator event of severity
error that stays active until an administrator acknowledges it, and a CRITICAL log line; everything
its session does is recorded with the actor's ``via`` set to ``break_glass``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, Field

from kasou.config import Paths, site_file
from kasou.errors import StoreConflict, StoreError, Unauthorized
from kasou.store.base import Store

log = logging.getLogger(__name__)

NAME = "break-glass"
LIMIT_AFTER = 5
LIMIT_WAIT_S = 30.0
LIMIT_KEY = "auth/break-glass-limit"  # {"failures": N, "last_failure": UNIX TIME}
CAS_TRIES = 50  # compare-and-swap rounds on the count before an attempt gives up
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud and typed under pressure
_hasher = PasswordHasher()


def default_path(store: Store | None = None) -> Path:
    """``KASOU_BREAK_GLASS_FILE``, else beside the SQLite store (the kasou home), else in ``KASOU_HOME``."""
    return site_file(
        "break-glass.json", "KASOU_BREAK_GLASS_FILE", store.local_dir() if store else None, Paths.from_env().home
    )


class BreakGlassFile(BaseModel):
    id: str  # changes at each rotation: the sessions of an older password end
    password_hash: str = Field(repr=False)
    rotated_at: float


class Rotated(BaseModel):
    password: str = Field(repr=False)  # shown this once
    file: str
    rotated_at: float
    replaced: bool  # an older break-glass password was replaced (its sessions ended)


def new_password() -> str:
    """Five groups of five letters and digits (~123 bits), easy to read from a sealed envelope."""
    chars = "".join(secrets.choice(_ALPHABET) for _ in range(25))
    return "-".join(chars[i : i + 5] for i in range(0, 25, 5))


def read(p: Path) -> BreakGlassFile | None:
    """The file's content, or None if there is none (or it cannot be read: logged)."""
    try:
        st = p.stat()
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("the break-glass file %s cannot be read: %s", p, type(e).__name__)
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.error("the break-glass file %s is readable by others (mode %o): chmod 600 it", p, st.st_mode & 0o777)
    try:
        return BreakGlassFile.model_validate(data)
    except ValueError:
        log.error("the break-glass file %s is not valid", p)
        return None


def _write(p: Path, rec: BreakGlassFile) -> Path:
    """Write the file atomically (a new file of mode 0600 renamed over the old one)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec.model_dump(mode="json")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot write the break-glass file {p}: {e.strerror or type(e).__name__}") from None
    return p


class BreakGlass:
    """The account's file and its rate limit (checked by the server that checks sign-ins: the leader).

    An attempt is counted as failed *before* its password is checked, with one compare-and-swap on the count in
    the store (which also refuses an attempt while the limit holds), and the count ends when the password is
    right. So attempts sent all at once, to one server or to several, are each counted, and no more than
    ``LIMIT_AFTER`` passwords are checked before the wait applies."""

    def __init__(self, store: Store | None = None) -> None:
        self.store = store
        self.failures = 0  # the count when the store cannot be used (and the last one seen there)
        self.last_failure = 0.0

    @property
    def path(self) -> Path:
        return default_path(self.store)

    async def rotate(self) -> Rotated:
        password = new_password()
        digest = await asyncio.to_thread(_hasher.hash, password)
        old = read(self.path)
        rec = BreakGlassFile(id=secrets.token_hex(8), password_hash=digest, rotated_at=time.time())
        p = await asyncio.to_thread(_write, self.path, rec)
        await self._clear()
        return Rotated(password=password, file=str(p), rotated_at=rec.rotated_at, replaced=old is not None)

    def current_id(self) -> str | None:
        rec = read(self.path)
        return rec.id if rec is not None else None

    def _refuse_if_limited(self, failures: int, last_failure: float, now: float) -> None:
        if failures >= LIMIT_AFTER and now - last_failure < LIMIT_WAIT_S:
            raise Unauthorized(f"the break-glass account is rate-limited after {failures} wrong passwords; "
                               f"try again in {LIMIT_WAIT_S - (now - last_failure):.0f} s")  # fmt: skip

    def _charge_in_memory(self, now: float) -> None:
        self._refuse_if_limited(self.failures, self.last_failure, now)
        self.failures += 1
        self.last_failure = now

    async def _charge(self) -> None:
        """Count one attempt as failed, refusing it while the limit holds (compare-and-swap in the store)."""
        for _ in range(CAS_TRIES):
            now = time.time()
            if self.store is None:
                self._charge_in_memory(now)
                return
            try:
                e = await self.store.get(LIMIT_KEY)
            except StoreError as err:
                log.warning("break-glass: the rate limit is kept in memory (the store: %s)", err)
                self._charge_in_memory(now)
                return
            failures, last = 0, 0.0
            if e is not None and isinstance(e.value, dict):
                with contextlib.suppress(TypeError, ValueError):
                    failures = int(e.value.get("failures", 0))
                    last = float(e.value.get("last_failure", 0.0))
            self._refuse_if_limited(failures, last, now)
            try:
                await self.store.put(LIMIT_KEY, {"failures": failures + 1, "last_failure": now},
                                     expect_rev=e.mod_rev if e is not None else 0)  # fmt: skip
            except StoreConflict:
                continue
            except StoreError as err:
                log.warning("break-glass: the rate limit is kept in memory (the store: %s)", err)
                self._charge_in_memory(now)
                return
            self.failures, self.last_failure = failures + 1, now
            return
        raise Unauthorized("the break-glass account is being tried from several places at once; try again")

    async def _clear(self) -> None:
        """The right password (or a new one): the count ends."""
        self.failures, self.last_failure = 0, 0.0
        if self.store is None:
            return
        try:
            await self.store.delete(LIMIT_KEY)
        except StoreError as err:
            log.warning("break-glass: the rate limit could not be cleared in the store: %s", err)

    async def check(self, password: str) -> BreakGlassFile:
        """The file if ``password`` is the break-glass password; Unauthorized otherwise (rate-limited)."""
        await self._charge()
        rec = read(self.path)
        ok = False
        if rec is not None:
            with contextlib.suppress(VerificationError, InvalidHashError):
                ok = await asyncio.to_thread(_hasher.verify, rec.password_hash, password)
        if rec is None or not ok:
            log.warning("break-glass sign-in refused (%d wrong in a row)", self.failures)
            if rec is None:
                raise Unauthorized("the break-glass account is not set up on this server: kasou user break-glass")
            raise Unauthorized("wrong user name or password")
        await self._clear()
        return rec
