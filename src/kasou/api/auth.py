"""The API token: made at first start, readable by root only, required on every call."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from kasou.errors import Unauthorized


def ensure_token(path: Path) -> str:
    """Read the token, creating it (mode 0600) if there is none yet."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def read_token(path: Path) -> str:
    """The token for a client: ``KASOU_TOKEN`` or the token file."""
    env = os.environ.get("KASOU_TOKEN")
    if env:
        return env.strip()
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise Unauthorized(f"no API token at {path}; start kasou with: kasou up") from None
    except PermissionError:
        raise Unauthorized(f"cannot read the API token at {path}: run as root or set KASOU_TOKEN") from None


def check_bearer(header: str | None, token: str) -> None:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("an API token is required (Authorization: Bearer ...)")
    if not secrets.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode()):
        raise Unauthorized("the API token is not valid")
