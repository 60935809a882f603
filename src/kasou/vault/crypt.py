"""Backup keys and sealed chunks (docs/backup-server.md, "Keys").

A :class:`BackupKey` is an X25519 key pair plus a 32-byte id secret; hypervisors hold only its
:class:`PublicBackupKey` (the public key and the id secret), which can seal chunks and compute their ids
but not open them. The private part is printed once as a paper key (:meth:`BackupKey.paper`).

A sealed chunk: ``b"KSC1" + ephemeral X25519 public key (32) + nonce (12) + AES-256-GCM(zstd(plaintext))``,
the key from HKDF-SHA256 over the X25519 shared secret, the chunk id as associated data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kasou.errors import AlreadyExists, BackupCorrupt, InvalidSpec

CHUNK_SIZE = 4 * 1024 * 1024
MAGIC = b"KSC1"
HKDF_INFO = b"kasou-chunk-v1"
PAPER_PREFIX = "KASOU-BK1-"
ZSTD_LEVEL = 3
#: The largest plaintext a chunk holds (a disk chunk, or a VM's config).
MAX_PLAINTEXT = CHUNK_SIZE
_HEADER = len(MAGIC) + 32 + 12
_TAG = 16
_RAW = serialization.Encoding.Raw
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_PAYLOAD_CHARS = 103  # base32 of the 64-byte payload, without padding
_KEY_KIND = "kasou-backup-key"
_PUBLIC_KIND = "kasou-backup-public-key"


def _fingerprint(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _secret(value: object, what: str) -> bytes:
    """32 bytes from a hex string (a key file's field)."""
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise InvalidSpec(f"the key's {what} is not hexadecimal") from None
    if len(raw) != 32:
        raise InvalidSpec(f"the key's {what} is {len(raw)} bytes long, not 32")
    return raw


def _read_json(data: str | bytes | dict[str, Any], kind: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except ValueError:
            raise InvalidSpec("the key file is not JSON") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise InvalidSpec(f"not a {kind} file (its kind is {data.get('kind') if isinstance(data, dict) else None!r})")
    if data.get("version") != 1:
        raise InvalidSpec(f"{kind} version {data.get('version')!r} is not known (1 is)")
    return data


def _check_fingerprint(data: dict[str, Any], actual: str) -> None:
    stated = data.get("fingerprint")
    if stated is not None and not hmac.compare_digest(str(stated), actual):
        raise InvalidSpec(f"the key file says fingerprint {stated}, but its key's is {actual}: the file is damaged")


def _write_new(path: str | Path, text: str) -> None:
    """Write ``text`` to a new file ``path``, mode 0600, atomically; an existing file is never replaced."""
    path = Path(path)
    if path.exists():
        raise AlreadyExists(f"{path} exists; a key file is never overwritten")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile: never replaces
        except FileExistsError:
            raise AlreadyExists(f"{path} exists; a key file is never overwritten") from None
    finally:
        tmp.unlink(missing_ok=True)


class _KeyFile:
    """What both halves of a backup key share: one JSON form (with the fingerprint, checked when read), one file
    written once (mode 0600), never replaced."""

    KIND: ClassVar[str]
    FIELD: ClassVar[str]  # the name of the key's raw bytes in the JSON form
    id_secret: bytes

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def _raw(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _of(cls, raw: bytes, id_secret: bytes) -> Self:
        raise NotImplementedError

    def to_json(self) -> str:
        fields = {self.FIELD: self._raw().hex(), "id_secret": self.id_secret.hex()}
        return json.dumps({"kind": self.KIND, "version": 1, "fingerprint": self.fingerprint, **fields}, indent=2)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Self:
        d = _read_json(data, cls.KIND)
        key = cls._of(_secret(d.get(cls.FIELD), cls.FIELD.replace("_", " ")), _secret(d.get("id_secret"), "id secret"))
        _check_fingerprint(d, key.fingerprint)
        return key

    def save(self, path: str | Path) -> None:
        """Write a new file (mode 0600: the id secret is a secret too); an existing file is refused, never replaced."""
        _write_new(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_json(_read_file(path))


@dataclass(frozen=True, repr=False)
class PublicBackupKey(_KeyFile):
    """What a hypervisor holds: it seals chunks and computes their ids, it cannot open them."""

    KIND: ClassVar[str] = _PUBLIC_KIND
    FIELD: ClassVar[str] = "public_key"
    public_key: X25519PublicKey
    id_secret: bytes

    def __repr__(self) -> str:
        return f"PublicBackupKey(fingerprint={self.fingerprint!r})"

    @property
    def public_raw(self) -> bytes:
        return self.public_key.public_bytes(_RAW, serialization.PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        """The first 16 hex digits of SHA-256 of the public key; every generation records it."""
        return _fingerprint(self.public_raw)

    def _raw(self) -> bytes:
        return self.public_raw

    @classmethod
    def _of(cls, raw: bytes, id_secret: bytes) -> Self:
        return cls(X25519PublicKey.from_public_bytes(raw), id_secret)


@dataclass(frozen=True, repr=False)
class BackupKey(_KeyFile):
    """The recovery key: the X25519 private key and the id secret. Never kept on a hypervisor."""

    KIND: ClassVar[str] = _KEY_KIND
    FIELD: ClassVar[str] = "private_key"
    private_key: X25519PrivateKey
    id_secret: bytes

    def __repr__(self) -> str:  # never print the secret parts
        return f"BackupKey(fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls) -> BackupKey:
        return cls(X25519PrivateKey.generate(), os.urandom(32))

    def public(self) -> PublicBackupKey:
        return PublicBackupKey(self.private_key.public_key(), self.id_secret)

    @property
    def fingerprint(self) -> str:
        return self.public().fingerprint

    @property
    def private_raw(self) -> bytes:
        return self.private_key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())

    def _raw(self) -> bytes:
        return self.private_raw

    @classmethod
    def _of(cls, raw: bytes, id_secret: bytes) -> Self:
        return cls(X25519PrivateKey.from_private_bytes(raw), id_secret)

    def paper(self) -> str:
        """``KASOU-BK1-`` then base32 (RFC 4648, no padding) of private key + id secret in groups of 4,
        then a 4-character checksum group (the first 20 bits of SHA-256 of those 64 bytes)."""
        payload = self.private_raw + self.id_secret
        text = base64.b32encode(payload).decode().rstrip("=")
        groups = [text[i : i + 4] for i in range(0, _PAYLOAD_CHARS, 4)]
        return PAPER_PREFIX + "-".join([*groups, _checksum(payload)])

    @classmethod
    def from_paper(cls, text: str) -> BackupKey:
        """Read a paper key back (spaces, dashes and case ignored); a mistyped group is refused in one line."""
        payload = _parse_paper(text)
        return cls(X25519PrivateKey.from_private_bytes(payload[:32]), payload[32:])


def _read_file(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise InvalidSpec(f"no key file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"cannot read the key file {path}: {e}") from None


# -- the paper key -------------------------------------------------------------------------------------------


def _checksum(payload: bytes) -> str:
    """The first 20 bits of SHA-256 of ``payload`` as 4 base32 characters."""
    bits = int.from_bytes(hashlib.sha256(payload).digest()[:3], "big") >> 4
    return "".join(_B32[(bits >> shift) & 31] for shift in (15, 10, 5, 0))


def _decode(chars: str) -> bytes | None:
    """The 64-byte payload of 103 base32 characters; None unless they are its one canonical encoding."""
    try:
        raw = base64.b32decode(chars + "=" * (-len(chars) % 8))
    except ValueError:
        return None
    if len(raw) != 64 or base64.b32encode(raw).decode().rstrip("=") != chars:
        return None
    return raw


def _valid(chars: str) -> bytes | None:
    payload = _decode(chars[:_PAYLOAD_CHARS])
    if payload is None or not hmac.compare_digest(_checksum(payload), chars[_PAYLOAD_CHARS:]):
        return None
    return payload


def _group(chars: str, pos: int) -> tuple[int, str]:
    """The group (numbered from 1, as printed) holding character ``pos``, and its characters."""
    if pos >= _PAYLOAD_CHARS:
        return _PAYLOAD_CHARS // 4 + 2, chars[_PAYLOAD_CHARS:]
    n = pos // 4
    return n + 1, chars[n * 4 : n * 4 + 4]


def _suspect(chars: str) -> str:
    """Which group is mistyped, when one changed or swapped character makes the key valid: a hint, never a fix
    (the key stays refused; the person checks that group against the paper)."""
    found: set[int] = set()
    for pos in range(len(chars)):
        for c in _B32:
            if c != chars[pos] and _valid(chars[:pos] + c + chars[pos + 1 :]) is not None:
                found.add(pos)
        if pos + 1 < len(chars) and chars[pos] != chars[pos + 1]:
            swapped = chars[:pos] + chars[pos + 1] + chars[pos] + chars[pos + 2 :]
            if _valid(swapped) is not None:
                found.update((pos, pos + 1))
    groups = {_group(chars, p) for p in found}
    if len(groups) != 1:
        return "a group is mistyped: check each group against the paper"
    number, group = groups.pop()
    return f"group {number} ({group}) looks mistyped: check it against the paper"


def _parse_paper(text: str) -> bytes:
    chars = "".join(str(text).split()).replace("-", "").upper()
    prefix = PAPER_PREFIX.replace("-", "")
    if not chars.startswith(prefix):
        raise InvalidSpec(f"a paper key starts with {PAPER_PREFIX}", field="paper_key")
    chars = chars[len(prefix) :]
    for pos, c in enumerate(chars):
        if c not in _B32:
            number, group = _group(chars, pos)
            hint = " (only A-Z and 2-7 are used: 0 is O, 1 is I, 8 is B)" if c in "0189" else ""
            raise InvalidSpec(f"paper key group {number} ({group}) has {c!r}, which is not a base32 letter{hint}",
                              field="paper_key")  # fmt: skip
    expected = _PAYLOAD_CHARS + 4
    if len(chars) != expected:
        what = "missing" if len(chars) < expected else "too many"
        raise InvalidSpec(f"a paper key has {expected} characters after {PAPER_PREFIX}, this one {len(chars)}: "
                          f"a character is {what}", field="paper_key")  # fmt: skip
    payload = _valid(chars)
    if payload is None:
        raise InvalidSpec(f"the paper key's checksum does not match: {_suspect(chars)}", field="paper_key")
    return payload


# -- chunks ---------------------------------------------------------------------------------------------------


def chunk_id(key: PublicBackupKey | BackupKey, data: bytes) -> str:
    """Hex HMAC-SHA256 of the plaintext keyed with the id secret: 64 hex characters."""
    return hmac.new(key.id_secret, data, hashlib.sha256).hexdigest()


def _aead_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=HKDF_INFO)
    return hkdf.derive(shared)


def seal(pub: PublicBackupKey, data: bytes, cid: str | None = None) -> bytes:
    """Compress (zstd 3) and encrypt ``data`` to ``pub``; ``cid``, its chunk id, when the caller has it."""
    if len(data) > MAX_PLAINTEXT:
        raise InvalidSpec(f"a chunk holds at most {MAX_PLAINTEXT} bytes, not {len(data)}")
    cid = cid or chunk_id(pub, data)
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    key = _aead_key(eph.exchange(pub.public_key), eph_pub, pub.public_raw)
    nonce = os.urandom(12)
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return MAGIC + eph_pub + nonce + AESGCM(key).encrypt(nonce, packed, cid.encode("ascii"))


def unseal(key: BackupKey, cid: str, blob: bytes) -> bytes:
    """Decrypt and decompress a sealed chunk; BackupCorrupt unless it is the chunk ``cid`` sealed to ``key``."""
    short = cid[:12]
    if len(blob) < _HEADER + _TAG or not blob.startswith(MAGIC):
        raise BackupCorrupt(f"chunk {short}… is not a sealed chunk (no KSC1 header)", chunk=cid)
    eph_pub = blob[4:36]
    nonce = blob[36:48]
    try:
        shared = key.private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        aead = AESGCM(_aead_key(shared, eph_pub, key.public().public_raw))
        packed = aead.decrypt(nonce, blob[_HEADER:], cid.encode("ascii"))
    except (InvalidTag, ValueError, UnicodeEncodeError):
        raise BackupCorrupt(f"chunk {short}… does not decrypt with key {key.fingerprint}: damaged, or sealed "
                            "to another key", chunk=cid) from None  # fmt: skip
    try:
        params = zstandard.get_frame_parameters(packed)
        if params.content_size > MAX_PLAINTEXT:  # also CONTENTSIZE_UNKNOWN: seal always records the size
            raise BackupCorrupt(f"chunk {short}… does not say a size kasou writes", chunk=cid)
        data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=MAX_PLAINTEXT)
    except zstandard.ZstdError as e:
        raise BackupCorrupt(f"chunk {short}… does not decompress: {e}", chunk=cid) from None
    if not hmac.compare_digest(chunk_id(key, data), cid):
        raise BackupCorrupt(f"chunk {short}… decrypts to other content than its id says", chunk=cid)
    return data
