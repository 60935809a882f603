"""Per-user API tokens for scripts: ``Authorization: Bearer ksu_...`` acts as that user.

A token is 256 random bits after the prefix ``ksu_``; it is shown once when made. The store keeps
only its SHA-256 (``user-tokens/<sha256>``) with a short public id (to list and revoke it), the
user, a label, when it was made, when it expires and when it was last used. A token works only while
its user exists and is not locked, and until it expires or is revoked.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from pydantic import BaseModel

from kasou.errors import Conflict, InvalidSpec, NotFound, Unauthorized
from kasou.store.base import Store

TOKENS_PREFIX = "user-tokens/"
TOKEN_PREFIX = "ksu_"
MAX_PER_USER = 20
EXPIRES_MAX_DAYS = 3650
LABEL_MAX = 100
TOUCH_EVERY_S = 60.0  # a token's last use is written at most this often


class TokenRecord(BaseModel):
    id: str
    user: str
    label: str = ""
    created_at: float
    expires_at: float | None = None
    last_used: float | None = None


class TokenView(TokenRecord):
    expired: bool


class TokenCreated(TokenView):
    token: str  # shown this once


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_user_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX)


def _view(t: TokenRecord, now: float) -> TokenView:
    return TokenView(**t.model_dump(), expired=t.expires_at is not None and t.expires_at <= now)


def check_label(label: object) -> str:
    if not isinstance(label, str) or len(label) > LABEL_MAX or not label.isprintable():
        raise InvalidSpec(f"a token's label has at most {LABEL_MAX} printable characters", field="label")
    return label.strip()


def check_expires(days: object) -> int | None:
    if days is None:
        return None
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= EXPIRES_MAX_DAYS:
        raise InvalidSpec(f"a token expires after 1 to {EXPIRES_MAX_DAYS} days", field="expires_days")
    return days


class UserTokens:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def _of(self, user: str) -> list[tuple[str, TokenRecord]]:
        out = []
        for e in await self.store.range(TOKENS_PREFIX):
            t = TokenRecord.model_validate(e.value)
            if t.user == user:
                out.append((e.key, t))
        return out

    async def create(self, user: str, label: str = "", expires_days: int | None = None) -> TokenCreated:
        """A new token for ``user`` (who must exist: the caller checks)."""
        label = check_label(label)
        expires_days = check_expires(expires_days)
        mine = await self._of(user)
        if len(mine) >= MAX_PER_USER:
            raise Conflict(f"user {user!r} has {MAX_PER_USER} API tokens already; revoke one first")
        now = time.time()
        taken = {t.id for _, t in mine}
        tid = "t-" + secrets.token_hex(6)
        while tid in taken:
            tid = "t-" + secrets.token_hex(6)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        rec = TokenRecord(id=tid, user=user, label=label, created_at=now,
                          expires_at=now + expires_days * 86400 if expires_days else None)  # fmt: skip
        await self.store.create(TOKENS_PREFIX + token_hash(token), rec.model_dump(mode="json"))
        return TokenCreated(**_view(rec, now).model_dump(), token=token)

    async def list(self, user: str) -> list[TokenView]:
        now = time.time()
        return sorted((_view(t, now) for _, t in await self._of(user)), key=lambda v: v.created_at)

    async def revoke(self, user: str, tid: str) -> TokenView:
        for key, t in await self._of(user):
            if t.id == tid:
                await self.store.delete(key)
                return _view(t, time.time())
        raise NotFound(f"user {user!r} has no API token {tid[:40]!r}")

    async def revoke_all(self, user: str) -> int:
        mine = await self._of(user)
        for key, _ in mine:
            await self.store.delete(key)
        return len(mine)

    async def check(self, token: str) -> TokenRecord:
        """The token's record if it is known and not expired (its last use noted); Unauthorized otherwise."""
        key = TOKENS_PREFIX + token_hash(token)
        e = await self.store.get(key)
        if e is None:
            raise Unauthorized("the API token is not valid (unknown or revoked)")
        rec = TokenRecord.model_validate(e.value)
        now = time.time()
        if rec.expires_at is not None and rec.expires_at <= now:
            raise Unauthorized(f"the API token {rec.id} of user {rec.user!r} has expired")
        if rec.last_used is None or now - rec.last_used > TOUCH_EVERY_S:
            await self.store.put(key, rec.model_copy(update={"last_used": now}).model_dump(mode="json"))
        return rec
