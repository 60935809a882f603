"""The backup server's client (docs/backup-server.md, "The server's API"), and backup and restore over it.

:class:`VaultClient` is synchronous (httpx); asyncio callers run its calls with ``asyncio.to_thread``. Every
call is bounded. Over https the server's certificate is pinned: verification by a CA is off, and each TLS
handshake is refused unless the SHA-256 of the server's DER certificate is the pinned one, before any
request (or token) is sent. Plain http is allowed to loopback addresses only.

:func:`backup_disk` uploads the chunks of one disk the server lacks, :func:`make_generation` seals the VM's
config and adds the generation's index, :func:`restore_disk` writes a disk back as a sparse raw file.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import ssl
import time
from collections.abc import Container, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from kasou.errors import AgentUnavailable, BackupCorrupt, InvalidSpec, KasouError, NotFound, OperationTimeout
from kasou.model.names import validate_name
from kasou.vault import chunking
from kasou.vault.crypt import CHUNK_SIZE, BackupKey, PublicBackupKey, chunk_id, seal, unseal
from kasou.wire import raise_for_response

DEFAULT_TIMEOUT = 30.0
CHUNK_TIMEOUT = 120.0  # one chunk of up to 8 MiB, on a slow link between sites
CONNECT_TIMEOUT = 10.0
MISSING_BATCH = 4096  # the server's bound on POST /v1/chunks/missing
MAX_BLOB = 8 * 1024 * 1024
BATCH_BYTES = 32 * 1024 * 1024  # plaintext read before asking the server which chunks it lacks
_HEX64 = re.compile(r"^[0-9a-f]{64}$")  # a chunk id, a certificate's SHA-256
_DISK_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,21}$")  # the driver's rule (kasou.hypervisor.base), not imported


class BackupServerUnavailable(AgentUnavailable):
    """The backup server does not answer (refused, unreachable, TLS failed)."""

    code = "backup_server_unavailable"


class CertificateMismatch(KasouError):
    """The server's certificate is not the pinned one: nothing was sent to it."""

    code = "certificate_mismatch"


# -- TLS with a pinned certificate ---------------------------------------------------------------------------


class _PinRefused(ssl.SSLCertVerificationError):
    """Raised inside the handshake; the client turns it into :class:`CertificateMismatch`."""


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons, spaces, case and a ``sha256:`` prefix ignored)."""
    hexed = re.sub(r"[\s:]", "", str(text).strip().lower().removeprefix("sha256:"))
    if not _HEX64.fullmatch(hexed):
        raise InvalidSpec(f"{text!r} is not a SHA-256 certificate fingerprint (64 hex digits)", field="fingerprint")
    return hexed


def _check_pin(context: ssl.SSLContext, der: bytes | None) -> None:
    want = getattr(context, "kasou_pin", None)
    if want is None:
        raise _PinRefused("no certificate fingerprint is pinned")
    got = hashlib.sha256(der or b"").hexdigest()
    if not hmac.compare_digest(got, want):
        raise _PinRefused(f"its certificate has SHA-256 {got}, not the pinned {want}")


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_pin(self.context, self.getpeercert(binary_form=True))


class _PinnedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check_pin(self.context, self.getpeercert(binary_form=True))


class _PinnedContext(ssl.SSLContext):
    """Checks the peer's certificate against ``kasou_pin`` at the end of every handshake (sockets and BIO)."""

    sslsocket_class = _PinnedSocket
    sslobject_class = _PinnedObject
    kasou_pin: str


def pinned_context(fingerprint: str) -> ssl.SSLContext:
    """A client TLS context (1.2 or later) that trusts exactly the certificate with this SHA-256 fingerprint."""
    ctx = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # no CA: the pin below is the check
    ctx.kasou_pin = normalize_fingerprint(fingerprint)
    return ctx


def _pin_refusal(exc: BaseException) -> _PinRefused | None:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, _PinRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_loopback(host: str) -> bool:
    """A loopback address (or localhost): the only place plain http is allowed (tests, a server on this host)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_chunk_id(cid: object) -> str:
    if not isinstance(cid, str) or not _HEX64.fullmatch(cid):
        raise InvalidSpec(f"{str(cid)[:80]!r} is not a chunk id (64 lower-case hex digits)", field="chunk")
    return cid


# -- the client ----------------------------------------------------------------------------------------------


class VaultClient:
    """One backup server, one bearer token. Usable as a context manager; :meth:`close` ends its connections."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        fingerprint: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``fingerprint``: the SHA-256 of the server's certificate (``kasou backup-server show``), required
        for https. ``transport``: for tests (an ASGI or mock transport) on a loopback http URL."""
        parts = urlsplit(url)
        if parts.scheme == "https":
            if fingerprint is None:
                raise InvalidSpec("a backup server over https needs its certificate's fingerprint", field="fingerprint")
            verify: ssl.SSLContext | bool = pinned_context(fingerprint)
        elif parts.scheme == "http" and is_loopback(parts.hostname or ""):
            verify = False
        else:
            raise InvalidSpec(f"{url!r}: a backup server is reached over https (http only on loopback)", field="url")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            verify=verify,
            transport=transport,
            trust_env=False,  # no proxy from the environment sees the token or the chunks
        )

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _fail(self, exc: httpx.HTTPError, timeout: float) -> KasouError:
        refused = _pin_refusal(exc)
        if refused is not None:
            reason = refused.args[0] if refused.args else "its certificate is not the pinned one"
            return CertificateMismatch(f"refused the backup server at {self.url}: {reason}; nothing was sent to it")
        if isinstance(exc, httpx.TimeoutException):
            return OperationTimeout(f"the backup server at {self.url} gave no answer in {timeout:.0f} s")
        return BackupServerUnavailable(f"the backup server at {self.url} is not reachable: {exc or type(exc).__name__}")

    def _call(self, method: str, path: str, timeout: float | None = None, **kw: Any) -> httpx.Response:
        timeout = timeout or self.timeout
        try:
            resp = self._http.request(method, path, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT), **kw)
        except httpx.HTTPError as e:
            raise self._fail(e, timeout) from None
        raise_for_response(resp)
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._call(method, path, **kw)
        try:
            return resp.json()
        except ValueError:
            raise KasouError(f"the backup server at {self.url} answered {method} {path} with no JSON") from None

    def info(self) -> dict[str, Any]:
        """``{"server_id", "version", "chunk_size"}``."""
        return dict(self._json("GET", "/v1/info"))

    def missing(self, ids: Iterable[str]) -> list[str]:
        """Which of ``ids`` the server does not hold (asked in batches of at most 4096)."""
        unique = list(dict.fromkeys(check_chunk_id(i) for i in ids))
        out: list[str] = []
        for start in range(0, len(unique), MISSING_BATCH):
            body = self._json("POST", "/v1/chunks/missing", json={"ids": unique[start : start + MISSING_BATCH]})
            out.extend(check_chunk_id(i) for i in body.get("missing", []))
        return out

    def put_chunk(self, cid: str, blob: bytes) -> bool:
        """Upload a sealed chunk: True if the server stored it, False if it held it already (it keeps its own)."""
        resp = self._call("PUT", f"/v1/chunks/{check_chunk_id(cid)}", timeout=max(self.timeout, CHUNK_TIMEOUT),
                          content=blob, headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        return resp.status_code == 201

    def get_chunk(self, cid: str) -> bytes:
        """The sealed blob of chunk ``cid`` (at most 8 MiB are read)."""
        timeout = max(self.timeout, CHUNK_TIMEOUT)
        try:
            with self._http.stream("GET", f"/v1/chunks/{check_chunk_id(cid)}",
                                   timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)) as resp:  # fmt: skip
                if resp.status_code >= 400:
                    resp.read()
                    raise_for_response(resp)
                body = bytearray()
                for part in resp.iter_bytes():
                    body += part
                    if len(body) > MAX_BLOB:
                        raise BackupCorrupt(f"chunk {cid[:12]}… is larger than any sealed chunk", chunk=cid)
        except httpx.HTTPError as e:
            raise self._fail(e, timeout) from None
        return bytes(body)

    def add_generation(self, index: dict[str, Any]) -> dict[str, Any]:
        """Add a generation; the server's state of it (``locked_until``...). Conflict if it exists."""
        return dict(self._json("POST", "/v1/generations", json=index))

    def list_generations(self, vm: str) -> list[dict[str, Any]]:
        """The generations of ``vm``, disks reduced to ``{disk_id, size}``, with the server's state."""
        body = self._json("GET", "/v1/generations", params={"vm": validate_name(vm, "vm")})
        items = body.get("generations", []) if isinstance(body, dict) else body
        return [dict(x) for x in items]

    def list_all(self) -> list[dict[str, Any]]:
        """Every generation the server holds, of every VM (disks reduced as in :meth:`list_generations`)."""
        body = self._json("GET", "/v1/generations")
        items = body.get("generations", []) if isinstance(body, dict) else body
        return [dict(x) for x in items]

    def get_generation(self, vm: str, generation: int) -> dict[str, Any]:
        """The index of one generation with the server's state, as one dict."""
        body = self._json("GET", f"/v1/generations/{validate_name(vm, 'vm')}/{int(generation)}")
        if isinstance(body.get("index"), dict):  # the index and the state side by side
            return {**body["index"], **(body.get("state") or {})}
        return dict(body)


# -- backup and restore --------------------------------------------------------------------------------------


def _previous_chunks(
    previous: dict[str, Any] | None, pub: PublicBackupKey, disk_id: str
) -> tuple[list[str | None] | None, int | None]:
    """The chunk list and size of ``disk_id`` in ``previous`` (a generation's index, or one disk entry of it);
    None when it cannot be reused (another key, another chunk size, no such disk)."""
    if previous is None:
        return None, None
    entry: dict[str, Any] | None = previous
    if "disks" in previous:
        if previous.get("key_fingerprint") != pub.fingerprint or previous.get("chunk_size", CHUNK_SIZE) != CHUNK_SIZE:
            return None, None
        entry = next((d for d in previous["disks"] if d.get("disk_id") == disk_id), None)
    if entry is None or not isinstance(entry.get("chunks"), list):
        return None, None
    return [None if c is None else check_chunk_id(c) for c in entry["chunks"]], int(entry.get("size", 0))


class _Uploader:
    """Asks the server which chunks it lacks, a batch at a time, and uploads only those, each once."""

    def __init__(self, client: VaultClient, pub: PublicBackupKey) -> None:
        self.client = client
        self.pub = pub
        self.held: set[str] = set()
        self.bytes_sent = 0
        self.chunks_sent = 0

    def upload(self, batch: Sequence[chunking.Chunk], reread: Any) -> dict[int, str]:
        """Upload the chunks of ``batch`` the server lacks; ``reread(index)`` reads one that was reused from the
        previous index and is gone from the server. Returns the ids that changed when read again."""
        ask = [c.id for c in batch if c.id is not None and c.id not in self.held]
        lacking = set(self.client.missing(ask)) if ask else set()
        changed: dict[int, str] = {}
        for c in batch:
            if c.id is None or c.id not in lacking or c.id in self.held:
                continue
            data = c.data if c.data is not None else reread(c.index)
            cid = chunk_id(self.pub, data)
            if cid != c.id:  # the disk changed where the caller said it had not: what is read is the truth
                changed[c.index] = cid
            self.send(cid, data)
        self.held.update(i for i in ask if i not in lacking)
        return changed

    def send(self, cid: str, data: bytes) -> None:
        if cid in self.held:
            return
        blob = seal(self.pub, data, cid)
        self.client.put_chunk(cid, blob)
        self.held.add(cid)
        self.bytes_sent += len(blob)
        self.chunks_sent += 1


def backup_disk(
    client: VaultClient,
    pub: PublicBackupKey,
    vm: str,
    disk_id: str,
    source: chunking.Source,
    size: int,
    previous: dict[str, Any] | None = None,
    changed: Container[int] | None = None,
) -> dict[str, Any]:
    """Upload the chunks of one raw disk image the server does not hold.

    ``previous``: the VM's previous generation (its index, as :meth:`VaultClient.get_generation` returns it)
    or that disk's entry; with ``changed`` (chunk indices written since) only those chunks are read. Returns
    the disk's entry of the index, plus ``bytes_sent``, ``bytes_read`` and ``chunks_sent``."""
    validate_name(vm, "vm")
    if not _DISK_ID.fullmatch(disk_id):
        raise InvalidSpec(f"disk id {disk_id[:40]!r} must start with a letter and have at most 22 letters, digits, "
                          "'-' or '_'", field="disk_id")  # fmt: skip
    prev_chunks, prev_size = _previous_chunks(previous, pub, disk_id)
    uploader = _Uploader(client, pub)
    chunks: list[str | None] = []
    bytes_read = 0
    with chunking.opened(source) as f:

        def reread(index: int) -> bytes:
            nonlocal bytes_read
            data = chunking.read_chunk(f, index, size)
            bytes_read += len(data)
            return data

        batch: list[chunking.Chunk] = []
        pending = 0

        def flush() -> None:
            nonlocal pending
            for index, cid in uploader.upload(batch, reread).items():
                chunks[index] = cid
            batch.clear()
            pending = 0

        for c in chunking.split(f, size, pub, previous=prev_chunks, previous_size=prev_size, changed=changed):
            chunks.append(c.id)
            if c.read:
                bytes_read += chunking.chunk_length(size, c.index)
            if c.data is not None:
                pending += len(c.data)
            if c.id is not None:
                batch.append(c)
            if pending >= BATCH_BYTES or len(batch) >= MISSING_BATCH:
                flush()
        flush()
    return {"disk_id": disk_id, "size": size, "chunks": chunks, "bytes_sent": uploader.bytes_sent,
            "bytes_read": bytes_read, "chunks_sent": uploader.chunks_sent}  # fmt: skip


def next_generation(client: VaultClient, vm: str) -> int:
    """The number after the newest generation the server lists for ``vm`` (1 for the first)."""
    return max((int(g["generation"]) for g in client.list_generations(vm)), default=0) + 1


def make_generation(
    client: VaultClient,
    pub: PublicBackupKey,
    vm: str,
    vm_uuid: str,
    disks: Sequence[dict[str, Any]],
    config: dict[str, Any],
    *,
    generation: int | None = None,
    created: float | None = None,
) -> dict[str, Any]:
    """Seal the VM's ``config`` as a chunk, then add the generation of ``disks`` (what :func:`backup_disk`
    returned for each). Returns the index with the server's state of it. Conflict if the number is taken."""
    validate_name(vm, "vm")
    uploader = _Uploader(client, pub)
    plain = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_id = chunk_id(pub, plain)
    if client.missing([config_id]):
        uploader.send(config_id, plain)
    entries = [{"disk_id": d["disk_id"], "size": int(d["size"]), "chunks": list(d["chunks"])} for d in disks]
    index = {
        "vm": vm,
        "vm_uuid": vm_uuid,
        "generation": generation if generation is not None else next_generation(client, vm),
        "created": created if created is not None else time.time(),
        "key_fingerprint": pub.fingerprint,
        "chunk_size": CHUNK_SIZE,
        "disks": entries,
        "config": config_id,
        "bytes_sent": uploader.bytes_sent + sum(int(d.get("bytes_sent", 0)) for d in disks),
        "bytes_logical": sum(e["size"] for e in entries),
    }
    state = client.add_generation(index)
    return {**index, **state}


def check_key(key: BackupKey, index: dict[str, Any]) -> None:
    """Refuse (before any chunk is read) a key that is not the one the generation was encrypted to."""
    stated = str(index.get("key_fingerprint", ""))
    if not hmac.compare_digest(stated, key.fingerprint):
        raise InvalidSpec(f"generation {index.get('generation')} of {index.get('vm')} was encrypted to key {stated}, "
                          f"not to this key ({key.fingerprint})", field="key")  # fmt: skip


def restore_config(client: VaultClient, key: BackupKey, index: dict[str, Any]) -> dict[str, Any]:
    """The VM's config a generation holds (spec, firmware variables, TPM state...)."""
    check_key(key, index)
    cid = check_chunk_id(index.get("config"))
    try:
        config = json.loads(unseal(key, cid, client.get_chunk(cid)))
    except ValueError:
        raise BackupCorrupt(f"the config of generation {index.get('generation')} is not JSON", chunk=cid) from None
    if not isinstance(config, dict):
        raise BackupCorrupt(f"the config of generation {index.get('generation')} is not a JSON object", chunk=cid)
    return config


def restore_disk(
    client: VaultClient, key: BackupKey, index: dict[str, Any], disk_id: str, dest_path: str | Path
) -> dict[str, Any]:
    """Write disk ``disk_id`` of the generation ``index`` to the new sparse raw file ``dest_path``: each chunk
    fetched once, unsealed and checked against its id. A failure leaves no file."""
    check_key(key, index)
    chunk_size = int(index.get("chunk_size", 0))
    if not 0 < chunk_size <= CHUNK_SIZE:
        raise InvalidSpec(f"the generation's chunk size {chunk_size} is not one kasou reads", field="chunk_size")
    entry = next((d for d in index.get("disks", []) if d.get("disk_id") == disk_id), None)
    if entry is None:
        have = ", ".join(str(d.get("disk_id")) for d in index.get("disks", [])) or "none"
        raise NotFound(f"generation {index.get('generation')} of {index.get('vm')} has no disk {disk_id!r} "
                       f"(it has: {have})")  # fmt: skip
    ids = [None if c is None else check_chunk_id(c) for c in entry["chunks"]]
    fetched = 0

    def fetch(cid: str) -> bytes:
        nonlocal fetched
        fetched += 1
        return unseal(key, cid, client.get_chunk(cid))

    written = chunking.write_image(dest_path, int(entry["size"]), ids, fetch, chunk_size)
    return {"disk_id": disk_id, "size": int(entry["size"]), "bytes_written": written, "chunks_fetched": fetched}
