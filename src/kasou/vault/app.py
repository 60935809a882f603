"""The backup server's HTTP API (docs/backup-server.md, "The server's API").

Only these routes exist: no DELETE, no PATCH, and no PUT but a chunk's (which never replaces what is
held). Retention, policy, verification and clients are the command line's, on the backup server itself.
Every request carries a bearer token the server issued: ``writer`` may use every route, ``reader`` the
GET routes, ``POST /v1/chunks/missing`` and ``POST /v1/generations/{vm}/{gen}/copied`` (a second site's
receipt, which a writer may not send).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from kasou import __version__
from kasou.errors import Forbidden, InvalidSpec, TooLarge, Unauthorized, WrongState
from kasou.model.names import validate_name
from kasou.vault import policy
from kasou.vault import timetable as vtimetable
from kasou.vault.index import CHUNK_SIZE, MAX_BLOB, summary, validate_chunk_id, validate_generation
from kasou.vault.store import Client, Store
from kasou.wire import install_error_handlers

MAX_MISSING_IDS = 4096
MAX_JSON_BODY = 1024 * 1024  # a missing-chunks request: 4096 ids of 64 characters and their quotes
MAX_INDEX_BODY = 64 * 1024 * 1024  # an index: about 4 TiB of disks in 4 MiB chunks


async def _timetable_loop(store: Store) -> None:
    """Every ``TICK_S``: run what the timetable says is due (in a thread: syncs and verifies are long)."""
    started = store.clock()
    path = store.root / "timetable.json"
    while True:
        try:
            await run_in_threadpool(vtimetable.run_due, store, started)
        except Exception as e:  # a broken timetable file is an event, never the server's end
            store.event("timetable_failed", reason=f"{type(e).__name__}: {e}")
        seen = path.stat().st_mtime if path.exists() else None
        for _ in range(int(vtimetable.TICK_S)):  # a timetable just set is read within a second
            await asyncio.sleep(1.0)
            if (path.stat().st_mtime if path.exists() else None) != seen:
                break


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, read no further than ``limit`` bytes (413 past it)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the body may be at most {limit} bytes; this one is {length}")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise TooLarge(f"the body may be at most {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def read_json_body(request: Request, limit: int) -> Any:
    raw = await read_body(request, limit)
    try:
        return json.loads(raw)
    except ValueError:
        raise InvalidSpec("the body is not valid JSON", field="body") from None
    except RecursionError:
        raise InvalidSpec("the body's JSON is nested too deeply", field="body") from None


def create_app(store: Store, timetable: bool = False) -> FastAPI:
    """The API over ``store``; ``timetable``: also run the server's own timetable (kasou.vault.timetable)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_timetable_loop(store)) if timetable else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="kasou backup server", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)

    def client(request: Request) -> Client:
        if store.isolated:
            raise WrongState("this backup server is isolated from every client (kasou backup-server isolate); "
                             "nothing is read or written until it rejoins")  # fmt: skip
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("a bearer token is required (kasou backup-server client add)")
        found = store.authenticate(token.strip())
        if found is None:
            raise Unauthorized("the backup server does not know this token")
        return found

    def writer(c: Client = Depends(client)) -> Client:
        if c.role != "writer":
            raise Forbidden(f"client {c.name} is a reader: it may not write")
        return c

    def call(fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return run_in_threadpool(fn, *args)

    @app.get("/v1/info")
    def info(c: Client = Depends(client)) -> dict[str, Any]:
        i = store.info()
        return {"server_id": i["server_id"], "version": __version__, "chunk_size": CHUNK_SIZE, "role": c.role}

    @app.post("/v1/chunks/missing")
    async def missing(request: Request, _c: Client = Depends(client)) -> dict[str, list[str]]:
        body = await read_json_body(request, MAX_JSON_BODY)
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or len(ids) > MAX_MISSING_IDS:
            raise InvalidSpec(f'the body must be {{"ids": [...]}} with at most {MAX_MISSING_IDS} ids', field="ids")
        for cid in ids:
            validate_chunk_id(cid)
        return {"missing": await call(store.missing, ids)}

    @app.put("/v1/chunks/{chunk_id}", status_code=201)
    async def put_chunk(chunk_id: str, request: Request, _c: Client = Depends(writer)) -> JSONResponse:
        validate_chunk_id(chunk_id)
        blob = await read_body(request, MAX_BLOB)  # read even when held: a client still sending would see a reset
        if store.has_chunk(chunk_id):  # held: the stored blob stays, whatever this one is
            return JSONResponse({"id": chunk_id, "stored": False}, status_code=200)
        stored = await call(store.put_chunk, chunk_id, blob)
        return JSONResponse({"id": chunk_id, "stored": stored}, status_code=201 if stored else 200)

    @app.get("/v1/chunks/{chunk_id}")
    def get_chunk(chunk_id: str, _c: Client = Depends(client)) -> Response:
        digest, blob = store.read_chunk(chunk_id)
        # The SHA-256 the server stored when it received the blob: a reader (a second site's sync) checks it
        return Response(blob, media_type="application/octet-stream", headers={"X-Kasou-Chunk-Sha256": digest.hex()})

    @app.post("/v1/generations", status_code=201)
    async def add_generation(request: Request, _c: Client = Depends(writer)) -> dict[str, Any]:
        index = await read_json_body(request, MAX_INDEX_BODY)
        state: dict[str, Any] = await call(policy.add_generation, store, index)
        return state

    @app.get("/v1/generations")
    def list_generations(vm: str | None = None, _c: Client = Depends(client)) -> list[dict[str, Any]]:
        if vm is not None:
            validate_name(vm, "vm")
        out = []
        for name in [vm] if vm else store.vms():
            for gen in store.generation_numbers(name):
                out.append({**summary(store.index(name, gen)), **store.state_fields(name, gen)})
        return out

    @app.post("/v1/generations/{vm}/{generation}/copied")
    async def mark_copied(vm: str, generation: int, c: Client = Depends(client)) -> dict[str, Any]:
        """A second site (a reader: its sync) holds a verified copy; recorded under the client's own name."""
        if c.role != "reader":
            raise Forbidden(f"client {c.name} is a writer: only a second site's reader says it holds a copy")
        validate_name(vm, "vm")
        state: dict[str, Any] = await call(store.mark_copied, vm, validate_generation(generation), c.name)
        return state

    @app.get("/v1/generations/{vm}/{generation}")
    def get_generation(vm: str, generation: int, _c: Client = Depends(client)) -> dict[str, Any]:
        validate_name(vm, "vm")
        return store.generation(vm, validate_generation(generation))

    return app
