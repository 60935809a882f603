"""The backup server's data directory (docs/backup-server.md, "The data directory").

::

    D/server.json                       server id, name, created, whether chattr +i works here
    D/tls/cert.pem, key.pem             its own self-signed certificate (kasou.vault.tlscert)
    D/clients.json                      token hashes (SHA-256) and roles
    D/policy.json                       retention and lock policy (kasou.vault.policy)
    D/chunks/<id[:4]>/<id>              sha256(blob) (32 bytes) + blob
    D/generations/<vm>/<gen:06d>.json   the index as received, written once
    D/state/<vm>/<gen:06d>.json         the server's state of it
    D/events.jsonl                      what happened, with time

Every write is a temporary file, fsync, then a rename (files the server rewrites) or a link that fails
if the name exists (chunks and indexes: never replaced). Read-modify-writes hold ``D/.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou import __version__
from kasou.errors import AlreadyExists, BackupCorrupt, Forbidden, InvalidSpec, NotFound, TooLarge, WrongState
from kasou.model.names import validate_name
from kasou.vault import immutable
from kasou.vault.index import (
    FINGERPRINT_RE,
    MAGIC,
    MAX_BLOB,
    STATE_KEYS,
    chunk_ids,
    validate_chunk_id,
    validate_generation,
    validate_index,
)

ROLES = ("writer", "reader")
HASH_LEN = 32
Clock = Callable[[], float]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, replace: bool = True, mode: int = 0o600, mtime: float | None = None
) -> bool:
    """Write ``data`` to ``path`` whole or not at all. ``replace=False``: never replace an existing file
    (the write is linked into place, which fails if the name exists); returns whether it was written.
    ``mtime``: the file's time (the store's clock, which garbage collection reads)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    written = True
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            written = False
        finally:
            os.unlink(tmp)
    fsync_dir(path.parent)
    return written


def write_json(path: Path, data: Any, *, replace: bool = True) -> bool:
    return atomic_write(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), replace=replace)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def gen_name(generation: int) -> str:
    return f"{generation:06d}.json"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Client:
    name: str
    role: str


class Store:
    """One data directory. Made by :meth:`create`, opened by the constructor (which refuses a directory that
    is not one)."""

    def __init__(self, root: Path, clock: Clock = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        if not (self.root / "server.json").is_file():
            raise NotFound(
                f"{self.root} is not a backup server's data directory (make one with: kasou backup-server init)"
            )
        self._info_cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self._clients_cache: tuple[tuple[int, int], list[dict[str, Any]]] | None = None

    # -- the directory ------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, name: str, clock: Clock = time.time) -> Store:
        validate_name(name, "server name")
        root = Path(root)
        if (root / "server.json").exists():
            raise AlreadyExists(f"{root} is a backup server's data directory already")
        if root.exists() and any(root.iterdir()):
            raise AlreadyExists(f"{root} is not empty: give a new or empty directory")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in ("tls", "chunks", "generations", "state"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        write_json(root / "clients.json", {"clients": []})
        (root / "events.jsonl").touch(mode=0o600)
        info = {
            "server_id": str(uuid.uuid4()),
            "name": name,
            "created": clock(),
            "version": __version__,
            "immutable": immutable.probe(root / "chunks"),
        }
        write_json(root / "server.json", info)  # last: its presence says the directory is whole
        store = cls(root, clock)
        store.event("initialized", name=name, immutable=info["immutable"])
        return store

    def info(self) -> dict[str, Any]:
        """``server.json`` (read again only when it changed: every request asks whether the server is isolated)."""
        path = self.root / "server.json"
        st = path.stat()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._info_cache is None or self._info_cache[0] != key:
            self._info_cache = (key, dict(read_json(path)))
        return dict(self._info_cache[1])

    @property
    def immutable(self) -> bool:
        return bool(self.info().get("immutable"))

    @property
    def isolated(self) -> bool:
        """Cut off from every client (``kasou backup-server isolate``): the API answers nothing but a refusal."""
        return bool(self.info().get("isolated"))

    def set_isolated(self, on: bool) -> None:
        with self.locked():
            info = self.info()
            info["isolated"] = on
            write_json(self.root / "server.json", info)
        self.event("isolated" if on else "rejoined")

    def probe_immutable(self) -> bool:
        """Check again whether the file system keeps the immutable flag (the directory may have moved), and
        record the answer in server.json."""
        ok = immutable.probe(self.root / "chunks")
        with self.locked():
            info = self.info()
            if info.get("immutable") != ok:
                info["immutable"] = ok
                write_json(self.root / "server.json", info)
        return ok

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the data directory's lock (read-modify-writes, adding and removing generations)."""
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"time": self.clock(), "event": kind, **fields}, sort_keys=True) + "\n"
        fd = os.open(self.root / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        with open(self.root / "events.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    # -- clients ------------------------------------------------------------------------

    def _client_entries(self) -> list[dict[str, Any]]:
        path = self.root / "clients.json"
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        if self._clients_cache is None or self._clients_cache[0] != key:
            self._clients_cache = (key, list(read_json(path)["clients"]))
        return self._clients_cache[1]

    def clients(self) -> list[dict[str, Any]]:
        """The clients, without their token hashes."""
        return [{k: v for k, v in c.items() if k != "token_sha256"} for c in self._client_entries()]

    def add_client(self, name: str, role: str) -> str:
        """Issue a token to a new client; returns it (it is stored only as its SHA-256)."""
        validate_name(name, "client name")
        if role not in ROLES:
            raise InvalidSpec(f"role must be one of {', '.join(ROLES)}, not {role!r}", field="role")
        token = "kbs1_" + secrets.token_urlsafe(32)
        with self.locked():
            data = read_json(self.root / "clients.json")
            if any(c["name"] == name for c in data["clients"]):
                raise AlreadyExists(f"client {name} exists already")
            entry = {"name": name, "role": role, "token_sha256": token_hash(token), "created": self.clock()}
            data["clients"].append(entry)
            write_json(self.root / "clients.json", data)
        self.event("client_added", client=name, role=role)
        return token

    def remove_client(self, name: str) -> None:
        with self.locked():
            data = read_json(self.root / "clients.json")
            kept = [c for c in data["clients"] if c["name"] != name]
            if len(kept) == len(data["clients"]):
                raise NotFound(f"no client {name}")
            write_json(self.root / "clients.json", {"clients": kept})
        self.event("client_removed", client=name)

    # -- the backup keys generations may be encrypted to ---------------------------------

    def allowed_keys(self) -> list[str]:
        """The key fingerprints this server accepts generations for (empty: any key, until one is allowed)."""
        path = self.root / "keys.json"
        return list(read_json(path)["allowed"]) if path.exists() else []

    def allow_key(self, fingerprint: str) -> None:
        """Accept generations encrypted to this key. Once a key is allowed, every other key is refused: an
        attacker holding the hypervisors and kasou's administrator token cannot have new generations
        encrypted to a key of their own."""
        if not FINGERPRINT_RE.fullmatch(fingerprint):
            raise InvalidSpec(f"{fingerprint!r} is not a backup key fingerprint (16 lowercase hex digits)",
                              field="fingerprint")  # fmt: skip
        with self.locked():
            have = self.allowed_keys()
            if fingerprint not in have:
                write_json(self.root / "keys.json", {"allowed": [*have, fingerprint]})
        self.event("key_allowed", key=fingerprint)

    def disallow_key(self, fingerprint: str) -> None:
        with self.locked():
            have = self.allowed_keys()
            if fingerprint not in have:
                raise NotFound(f"key {fingerprint} is not allowed here")
            write_json(self.root / "keys.json", {"allowed": [k for k in have if k != fingerprint]})
        self.event("key_disallowed", key=fingerprint)

    def authenticate(self, token: str) -> Client | None:
        """The client holding ``token``, or None. Every stored hash is compared in constant time."""
        presented = token_hash(token).encode()
        found: Client | None = None
        for c in self._client_entries():
            if hmac.compare_digest(presented, str(c["token_sha256"]).encode()):
                found = Client(c["name"], c["role"])
        return found

    # -- chunks -------------------------------------------------------------------------

    def chunk_path(self, chunk_id: str) -> Path:
        validate_chunk_id(chunk_id)
        return self.root / "chunks" / chunk_id[:4] / chunk_id

    def has_chunk(self, chunk_id: str) -> bool:
        return self.chunk_path(chunk_id).is_file()

    def missing(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` not held. A held chunk's time is renewed where it can be, so that garbage
        collection spares it while the client makes the generation that will refer to it."""
        out = []
        now = self.clock()
        for cid in dict.fromkeys(ids):
            path = self.chunk_path(cid)
            if not path.is_file():
                out.append(cid)
                continue
            with contextlib.suppress(OSError):  # an immutable chunk: a generation holds it anyway
                os.utime(path, (now, now))
        return out

    def put_chunk(self, chunk_id: str, blob: bytes) -> bool:
        """Keep a sealed blob under its id; True if stored, False if the id was held (the stored blob is
        never replaced: the first writer wins)."""
        path = self.chunk_path(chunk_id)
        if len(blob) > MAX_BLOB:
            raise TooLarge(f"a chunk may be at most {MAX_BLOB} bytes; this one is {len(blob)}")
        if not blob.startswith(MAGIC):
            raise InvalidSpec("a chunk must be a sealed blob (starting with KSC1)", field="body")
        if path.exists():
            return False
        path.parent.mkdir(mode=0o700, exist_ok=True)
        return atomic_write(path, hashlib.sha256(blob).digest() + blob, replace=False, mtime=self.clock())

    def read_chunk(self, chunk_id: str) -> tuple[bytes, bytes]:
        """The stored SHA-256 and the blob of a chunk."""
        try:
            data = self.chunk_path(chunk_id).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no chunk {chunk_id}") from None
        if len(data) < HASH_LEN + len(MAGIC):
            raise BackupCorrupt(f"chunk {chunk_id} is truncated on this server", chunk=chunk_id)
        return data[:HASH_LEN], data[HASH_LEN:]

    def chunk_sound(self, chunk_id: str) -> bool:
        """Whether the chunk is held and its blob still hashes to its stored SHA-256."""
        try:
            digest, blob = self.read_chunk(chunk_id)
        except (NotFound, BackupCorrupt):
            return False
        return hmac.compare_digest(digest, hashlib.sha256(blob).digest())

    def chunk_files(self) -> Iterator[tuple[str, Path]]:
        base = self.root / "chunks"
        for sub in sorted(base.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if not p.name.startswith("."):
                        yield p.name, p

    def remove_chunk(self, chunk_id: str) -> None:
        path = self.chunk_path(chunk_id)
        immutable.set_immutable(path, False)
        path.unlink(missing_ok=True)

    # -- generations --------------------------------------------------------------------

    def index_path(self, vm: str, generation: int) -> Path:
        validate_name(vm, "vm")
        return self.root / "generations" / vm / gen_name(validate_generation(generation))

    def state_path(self, vm: str, generation: int) -> Path:
        validate_name(vm, "vm")
        return self.root / "state" / vm / gen_name(validate_generation(generation))

    def vms(self) -> list[str]:
        base = self.root / "generations"
        return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.json")))

    def generation_numbers(self, vm: str) -> list[int]:
        validate_name(vm, "vm")
        d = self.root / "generations" / vm
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.glob("[0-9]*.json") if p.stem.isdigit())

    def has_generation(self, vm: str, generation: int) -> bool:
        return self.index_path(vm, generation).is_file()

    def index(self, vm: str, generation: int) -> dict[str, Any]:
        try:
            data: dict[str, Any] = read_json(self.index_path(vm, generation))
        except FileNotFoundError:
            raise NotFound(f"no generation {generation} of {vm}") from None
        return data

    def state(self, vm: str, generation: int) -> dict[str, Any]:
        try:
            data: dict[str, Any] = read_json(self.state_path(vm, generation))
        except FileNotFoundError:
            if not self.has_generation(vm, generation):
                raise NotFound(f"no generation {generation} of {vm}") from None
            data = {"received": None, "locked_until": None}  # written before its index: not expected
        return data

    def update_state(self, vm: str, generation: int, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        with self.locked():
            state = self.state(vm, generation)
            change(state)
            write_json(self.state_path(vm, generation), state)
        return state

    def add_generation(self, index: dict[str, Any], locked_until: float, **extra_state: Any) -> dict[str, Any]:
        """Keep a new generation: its index checked, every chunk it names held, its number new. The state
        says when it was received and until when it is locked; the index and its chunks are made immutable
        where the file system allows. Refusals are recorded as events."""
        try:
            validate_index(index)
        except InvalidSpec as e:
            self.event("refused", vm=str(index.get("vm"))[:63] if isinstance(index, dict) else None,
                       reason=e.message)  # fmt: skip
            raise
        vm, gen = index["vm"], index["generation"]
        ipath, spath = self.index_path(vm, gen), self.state_path(vm, gen)
        needed = chunk_ids(index)
        allowed = self.allowed_keys()
        if allowed and index["key_fingerprint"] not in allowed:
            self.event("refused", vm=vm, generation=gen, reason=f"key {index['key_fingerprint']} not allowed")
            raise Forbidden(f"generation {gen} of {vm} is encrypted to key {index['key_fingerprint']}, which this "
                            f"backup server does not accept (allowed: {', '.join(allowed)})")  # fmt: skip
        with self.locked():
            if ipath.exists():
                self.event("refused", vm=vm, generation=gen, reason="exists")
                raise AlreadyExists(f"generation {gen} of {vm} exists already", vm=vm, generation=gen)
            absent = sorted(c for c in needed if not self.has_chunk(c))
            if absent:
                self.event("refused", vm=vm, generation=gen, reason=f"{len(absent)} chunks not held")
                raise InvalidSpec(
                    f"generation {gen} of {vm} names {len(absent)} chunks this server does not hold "
                    f"(the first: {absent[0]})", field="chunks", missing=absent[:100],
                )  # fmt: skip
            received = self.clock()
            state: dict[str, Any] = {
                "vm": vm, "generation": gen, "received": received, "locked_until": locked_until,
                "verified_at": None, "damaged": [], "copied_to": [], "synced_from": None,
            }  # fmt: skip
            state.update(extra_state)
            ipath.parent.mkdir(mode=0o700, exist_ok=True)
            spath.parent.mkdir(mode=0o700, exist_ok=True)
            write_json(spath, state)
            if not write_json(ipath, index, replace=False):
                raise AlreadyExists(f"generation {gen} of {vm} exists already", vm=vm, generation=gen)
            locked = self.lock_files(vm, gen, needed)
        self.event("added", vm=vm, generation=gen, chunks=len(needed), locked_until=locked_until,
                   immutable=locked, **extra_state)  # fmt: skip
        return state

    def lock_files(self, vm: str, generation: int, ids: set[str]) -> bool:
        """chattr +i the index and chunks of a generation; False where the file system does not allow it."""
        if not self.immutable:
            return False
        ok = immutable.set_immutable(self.index_path(vm, generation), True)
        for cid in ids:
            ok = immutable.set_immutable(self.chunk_path(cid), True) and ok
        return ok

    def remove_generation(self, vm: str, generation: int) -> None:
        """Remove a generation's index and state (pruning); refused while it is locked."""
        state = self.state(vm, generation)
        until = state.get("locked_until")
        if until is not None and until > self.clock():
            raise WrongState(f"generation {generation} of {vm} is locked until {time.ctime(until)}")
        with self.locked():
            ipath = self.index_path(vm, generation)
            immutable.set_immutable(ipath, False)
            ipath.unlink(missing_ok=True)
            self.state_path(vm, generation).unlink(missing_ok=True)

    def generation(self, vm: str, generation: int) -> dict[str, Any]:
        """The index and the server's state of it, in one object."""
        return {**self.index(vm, generation), **self.state_fields(vm, generation)}

    def mark_copied(self, vm: str, generation: int, site: str) -> dict[str, Any]:
        """A second site says it holds a verified copy of the generation (``copied_to``: once per site, with
        the time this server heard it). Appends only: nothing of the generation itself changes."""
        if not self.has_generation(vm, generation):
            raise NotFound(f"no generation {generation} of VM {vm!r} on this backup server")

        def add(state: dict[str, Any]) -> None:
            sites = [c for c in state.get("copied_to") or [] if isinstance(c, dict)]
            if site not in {c.get("site") for c in sites}:
                sites.append({"site": site, "at": self.clock()})
            state["copied_to"] = sites

        state = self.update_state(vm, generation, add)
        self.event("copied", vm=vm, generation=generation, site=site)
        return {k: state.get(k) for k in STATE_KEYS}

    def state_fields(self, vm: str, generation: int) -> dict[str, Any]:
        s = self.state(vm, generation)
        return {k: s.get(k) for k in STATE_KEYS}
