"""A backup server in memory, following the routes of docs/backup-server.md, for the client's tests.

Not kasou.vault.app: it keeps chunks and generations in dicts, locks nothing on disk and knows two fixed
tokens (``writer-token``, ``reader-token``). It records the requests it answered in ``VaultDouble.requests``.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from kasou.errors import AlreadyExists, Forbidden, InvalidSpec, NotFound, TooLarge, Unauthorized
from kasou.model.names import validate_name
from kasou.wire import install_error_handlers

CHUNK_SIZE = 4 * 1024 * 1024
MAX_BLOB = 8 * 1024 * 1024
MAX_IDS = 4096
LOCK_DAYS = 30
WRITER_TOKEN = "writer-token"
READER_TOKEN = "reader-token"
_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class VaultDouble:
    """The double's state: chunks by id, generations by (vm, number), the server's state beside each."""

    tokens: dict[str, str] = field(default_factory=lambda: {WRITER_TOKEN: "writer", READER_TOKEN: "reader"})
    chunks: dict[str, bytes] = field(default_factory=dict)
    generations: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    states: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Forget every chunk, generation and request (one server serves a module's tests)."""
        self.chunks.clear()
        self.generations.clear()
        self.states.clear()
        self.requests.clear()

    def role(self, request: Request, writer: bool) -> None:
        auth = request.headers.get("authorization", "")
        role = self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if role is None:
            raise Unauthorized("no or a wrong token")
        if writer and role != "writer":
            raise Forbidden("a reader token may only read")
        self.requests.append((request.method, request.url.path))


def _chunk_id(value: object) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidSpec(f"{str(value)[:80]!r} is not a chunk id", field="chunk")
    return value


def _check_index(index: Any, chunks: dict[str, bytes]) -> tuple[str, int]:
    if not isinstance(index, dict):
        raise InvalidSpec("a generation is a JSON object")
    vm = validate_name(index.get("vm"), "vm")
    gen = index.get("generation")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
        raise InvalidSpec("generation must be a positive integer", field="generation")
    if index.get("chunk_size") != CHUNK_SIZE:
        raise InvalidSpec(f"chunk_size must be {CHUNK_SIZE}", field="chunk_size")
    if not isinstance(index.get("key_fingerprint"), str):
        raise InvalidSpec("key_fingerprint is missing", field="key_fingerprint")
    named = [_chunk_id(index.get("config"))]
    disks = index.get("disks")
    if not isinstance(disks, list):
        raise InvalidSpec("disks must be a list", field="disks")
    for disk in disks:
        validate_name(disk.get("disk_id"), "disk_id")
        size = disk.get("size")
        if not isinstance(size, int) or size < 0:
            raise InvalidSpec("a disk's size must be a non-negative integer", field="size")
        if len(disk.get("chunks", [])) != -(-size // CHUNK_SIZE):
            raise InvalidSpec(f"disk {disk['disk_id']}: the chunk list does not match its size", field="chunks")
        named += [_chunk_id(c) for c in disk["chunks"] if c is not None]
    lacking = [c for c in named if c not in chunks]
    if lacking:
        raise InvalidSpec(f"{len(lacking)} chunks the generation names are not held, e.g. {lacking[0]}",
                          field="chunks", missing=lacking[:10])  # fmt: skip
    return vm, gen


def create_vault_double(double: VaultDouble | None = None) -> FastAPI:
    """The FastAPI app of the double; its state is ``app.state.vault``."""
    vault = double or VaultDouble()
    app = FastAPI(title="kasou backup server (test double)")
    app.state.vault = vault
    install_error_handlers(app)

    @app.get("/v1/info")
    async def info(request: Request) -> dict[str, Any]:
        vault.role(request, writer=False)
        return {"server_id": "double-0001", "version": "test", "chunk_size": CHUNK_SIZE}

    @app.post("/v1/chunks/missing")
    async def missing(request: Request) -> dict[str, Any]:
        vault.role(request, writer=False)
        body = await request.json()
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            raise InvalidSpec("ids must be a list", field="ids")
        if len(ids) > MAX_IDS:
            raise InvalidSpec(f"at most {MAX_IDS} ids at a time, not {len(ids)}", field="ids")
        return {"missing": [i for i in map(_chunk_id, ids) if i not in vault.chunks]}

    @app.put("/v1/chunks/{cid}")
    async def put_chunk(cid: str, request: Request) -> Response:
        vault.role(request, writer=True)
        _chunk_id(cid)
        blob = await request.body()
        if len(blob) > MAX_BLOB:
            raise TooLarge(f"a chunk is at most {MAX_BLOB} bytes")
        if not blob.startswith(b"KSC1"):
            raise InvalidSpec("a sealed chunk starts with KSC1", field="body")
        if cid in vault.chunks:
            return JSONResponse({"id": cid, "stored": False}, status_code=200)
        vault.chunks[cid] = blob
        return JSONResponse({"id": cid, "stored": True}, status_code=201)

    @app.get("/v1/chunks/{cid}")
    async def get_chunk(cid: str, request: Request) -> Response:
        vault.role(request, writer=False)
        blob = vault.chunks.get(_chunk_id(cid))
        if blob is None:
            raise NotFound(f"no chunk {cid}")
        return Response(blob, media_type="application/octet-stream")

    @app.post("/v1/generations", status_code=201)
    async def add_generation(request: Request) -> dict[str, Any]:
        vault.role(request, writer=True)
        index = await request.json()
        vm, gen = _check_index(index, vault.chunks)
        if (vm, gen) in vault.generations:
            raise AlreadyExists(f"generation {gen} of {vm} exists")
        now = time.time()
        vault.generations[vm, gen] = index
        vault.states[vm, gen] = {"received": now, "locked_until": now + LOCK_DAYS * 86400, "verified_at": None,
                                 "damaged": [], "copied_to": []}  # fmt: skip
        return {"vm": vm, "generation": gen, **vault.states[vm, gen]}

    @app.get("/v1/generations")
    async def list_generations(request: Request, vm: str) -> list[dict[str, Any]]:
        vault.role(request, writer=False)
        validate_name(vm, "vm")
        out = []
        for (name, gen), index in sorted(vault.generations.items()):
            if name == vm:
                disks = [{"disk_id": d["disk_id"], "size": d["size"]} for d in index["disks"]]
                out.append({**index, "disks": disks, **vault.states[name, gen]})
        return out

    @app.get("/v1/generations/{vm}/{gen}")
    async def get_generation(vm: str, gen: int, request: Request) -> dict[str, Any]:
        vault.role(request, writer=False)
        index = vault.generations.get((validate_name(vm, "vm"), gen))
        if index is None:
            raise NotFound(f"no generation {gen} of {vm}")
        return {**index, **vault.states[vm, gen]}

    return app


def self_signed(directory: Path, name: str = "vault") -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1 (as ``kasou backup-server init`` makes one): cert, key, and the
    SHA-256 fingerprint of its DER form (hex)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread (https with ``tls``: cert, key); yields its URL."""
    port = free_port()
    extra: dict[str, Any] = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **extra))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the test backup server did not start")
        time.sleep(0.02)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
