"""Secrets kept in the store, sealed with the site's secrets key (AES-256-GCM).

A copy of the store (an etcd snapshot, a SQLite backup) then holds no usable second factor. What is
sealed today: the users' TOTP secrets (:mod:`kasou.control.users`).

The key is 32 random bytes, base64 in a file of mode 0600, made on first use: ``KASOU_SECRETS_KEY``,
else ``secrets.key`` beside the SQLite store (one host), else beside the API token file
(``KASOU_TOKEN_FILE``: one file shared by a cluster's hosts, so every control-plane host copies both).
A sealed value reads ``sealed:v1:KEYID:BASE64(nonce | ciphertext)``; its associated data names what it is (the user and
the field), so a value copied into another user's record does not open. A value without the prefix
is one written before sealing: it is read as it is and sealed at the next write.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kasou.config import Paths, site_file
from kasou.errors import StoreError
from kasou.store.base import Store

log = logging.getLogger(__name__)

PREFIX = "sealed:v1:"
KEY_BYTES = 32
NONCE_BYTES = 12


def default_key_path(store: Store | None = None) -> Path:
    return site_file(
        "secrets.key",
        "KASOU_SECRETS_KEY",
        store.local_dir() if store else None,
        Paths.from_env().token_file.absolute().parent,
    )


def key_id(key: bytes) -> str:
    """A short public name of a key (not a secret: a hash of it)."""
    return hashlib.sha256(b"kasou-secrets-key-id\0" + key).hexdigest()[:12]


def _read(path: Path) -> bytes | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read the secrets key {path}: {e}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise StoreError(f"the secrets key {path} is not {KEY_BYTES} bytes in base64")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("the secrets key %s is readable by others (mode %o); it should be 0600", path, mode)
    return key


def load_or_create(path: Path) -> bytes:
    """The key in ``path``; made (mode 0600, whole or not at all) if there is none. Two processes agree."""
    key = _read(path)
    if key is not None:
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    new = os.urandom(KEY_BYTES)
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(new).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # fails if another process made it meanwhile: then use theirs
        except FileExistsError:
            key = _read(path)
            assert key is not None
            return key
    finally:
        os.unlink(tmp)
    log.info("made the secrets key %s (key id %s)", path, key_id(new))
    return new


class Sealer:
    """Seals and opens values with the key in ``path`` (read once, made on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None

    def _loaded(self) -> bytes:
        if self._key is None:
            self._key = load_or_create(self.path)
        return self._key

    def seal(self, value: str, what: str) -> str:
        key = self._loaded()
        nonce = os.urandom(NONCE_BYTES)
        ct = AESGCM(key).encrypt(nonce, value.encode(), what.encode())
        return f"{PREFIX}{key_id(key)}:{base64.b64encode(nonce + ct).decode()}"

    def open(self, value: str, what: str) -> str:
        """The plain value; one not sealed (written before sealing) as it is. StoreError if it cannot open."""
        if not value.startswith(PREFIX):
            return value
        kid, _, body = value.removeprefix(PREFIX).partition(":")
        key = self._loaded()
        if kid != key_id(key):
            raise StoreError(f"{what} was sealed with secrets key {kid}, and this host's key {self.path} is "
                             f"{key_id(key)}: every control-plane host needs the same secrets key")  # fmt: skip
        try:
            raw = base64.b64decode(body, validate=True)
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], what.encode()).decode()
        except (ValueError, InvalidTag):
            raise StoreError(f"{what} does not open with secrets key {kid}: the record was altered") from None

    @staticmethod
    def is_sealed(value: str) -> bool:
        return value.startswith(PREFIX)
