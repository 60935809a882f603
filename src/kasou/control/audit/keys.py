"""The site's checkpoint signing key (Ed25519) and the public keys a verifier trusts.

The private key is a PEM (PKCS#8) file, mode 0600, made once on first use: ``KASOU_AUDIT_KEY``, else
``audit.key`` beside the SQLite store (that is ``$KASOU_HOME``), else ``$KASOU_HOME/audit.key``.
A verifier trusts the public key of that file and every ``*.pem`` public key in the directory
``audit-trusted/`` beside it (a cluster with one key per host puts the other hosts' public keys there).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kasou.config import Paths, site_file
from kasou.errors import StoreError
from kasou.store.base import Store

log = logging.getLogger(__name__)

TRUSTED_DIR = "audit-trusted"


def default_key_path(store: Store | None = None) -> Path:
    return site_file("audit.key", "KASOU_AUDIT_KEY", store.local_dir() if store else None, Paths.from_env().home)


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_b64(public: Ed25519PublicKey) -> str:
    return base64.b64encode(_raw(public)).decode()


def load_private(path: Path) -> Ed25519PrivateKey | None:
    """The key in ``path``, or None if there is none yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read the audit signing key {path}: {e}") from None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("the audit signing key %s is readable by others (mode %o); it should be 0600", path, mode)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as e:
        raise StoreError(f"the audit signing key {path} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise StoreError(f"the audit signing key {path} is not an Ed25519 key")
    return key


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``, made (mode 0600, created exclusively so two processes agree) if there is none."""
    key = load_private(path)
    if key is not None:
        return key
    new = Ed25519PrivateKey.generate()
    pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile: use theirs
        key = load_private(path)
        assert key is not None
        return key
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)
    log.info("made the audit signing key %s (key id %s)", path, key_id(new.public_key()))
    return new


def trusted_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key: that of the local key file, and every ``audit-trusted/*.pem``."""
    out: dict[str, Ed25519PublicKey] = {}
    own = load_private(path)
    if own is not None:
        out[key_id(own.public_key())] = own.public_key()
    d = path.parent / TRUSTED_DIR
    if d.is_dir():
        for f in sorted(d.glob("*.pem")):
            try:
                pub = serialization.load_pem_public_key(f.read_bytes())
            except (ValueError, OSError) as e:
                log.warning("ignoring the trusted audit key %s: %s", f, e)
                continue
            if isinstance(pub, Ed25519PublicKey):
                out[key_id(pub)] = pub
    return out


def signed_message(seq: int, digest: str, every: int | None = None) -> bytes:
    """What a checkpoint signs: the sequence number and the hash of that record (domain-separated), and the
    checkpoint interval its writer keeps from there on (checkpoints made before it was signed lack it)."""
    text = f"kasou-audit-checkpoint\n{seq}\n{digest}"
    return (text if every is None else f"{text}\nevery={every}").encode()


def sign(key: Ed25519PrivateKey, seq: int, digest: str, every: int | None = None) -> str:
    return base64.b64encode(key.sign(signed_message(seq, digest, every))).decode()


def check(public: Ed25519PublicKey, seq: int, digest: str, signature: str, every: int | None = None) -> bool:
    try:
        public.verify(base64.b64decode(signature, validate=True), signed_message(seq, digest, every))
    except (InvalidSignature, ValueError):
        return False
    return True
