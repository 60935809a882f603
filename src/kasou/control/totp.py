"""TOTP second factor (RFC 6238): 6 digits, SHA-1, 30 s steps, as every authenticator app reads them.

A code of the step before or after the current one is accepted too (clocks drift), and a code is
accepted once: the user's record keeps the last step a code was accepted for, and only a later
step is accepted after it (no replay within the window, nor of an older code).

The secret (160 random bits) is shown once, at enrolment, as base32 and as an ``otpauth://`` URI;
it is kept in the user's record in the store, sealed with the site's secrets key (:mod:`kasou.control.sealed`),
and never returned or logged again.
"""

from __future__ import annotations

import base64
import hmac
import os
import time

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

STEP_S = 30
DIGITS = 6
WINDOW = 1  # steps accepted either side of the current one
ISSUER = "kasou"


def new_secret() -> str:
    """A fresh secret, base32 without padding (what authenticator apps take)."""
    return base64.b32encode(os.urandom(20)).decode().rstrip("=")


def _totp(secret: str) -> TOTP:
    raw = base64.b32decode(secret + "=" * (-len(secret) % 8))
    return TOTP(raw, DIGITS, SHA1(), STEP_S, enforce_key_length=False)


def uri(secret: str, user: str) -> str:
    """The ``otpauth://`` URI for a QR code."""
    return _totp(secret).get_provisioning_uri(user, ISSUER)


def code_at(secret: str, when: float) -> str:
    """The code of the step holding ``when`` (for tests and for checking)."""
    return _totp(secret).generate(int(when)).decode()


def match(secret: str, code: object, last_step: int, now: float | None = None) -> int | None:
    """The step ``code`` is valid for (within the window, after ``last_step``), or None."""
    if not isinstance(code, str):
        return None
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isdigit():
        return None
    t = time.time() if now is None else now
    current = int(t) // STEP_S
    found = None
    totp = _totp(secret)
    for step in range(current - WINDOW, current + WINDOW + 1):
        if hmac.compare_digest(totp.generate(step * STEP_S).decode(), code) and step > last_step:
            found = step
    return found
