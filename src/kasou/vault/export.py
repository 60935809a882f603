"""Backups on removable media: ``export --to DIR`` writes the data directory's layout (chunks, indexes,
states; never its clients, key or policy) with a README.txt; ``import --from DIR`` reads it into a
backup server, each chunk checked against its stored SHA-256, each generation locked by this server's
policy. Both skip what the other side holds already, so a second export to the same media is quick."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasou.errors import BackupCorrupt, InvalidSpec, KasouError, NotFound
from kasou.model.names import validate_name
from kasou.vault import policy
from kasou.vault.index import chunk_ids, validate_chunk_id, validate_index
from kasou.vault.store import HASH_LEN, Store, atomic_write, gen_name, read_json, write_json

README = """\
kasou backup server export
==========================

This directory holds backup generations copied from the kasou backup server {name!r}
(server id {server_id}) on {when}: {count} generations of {vms} VMs.

  chunks/<id[:4]>/<id>               the SHA-256 of the blob (32 bytes) followed by the sealed blob
  generations/<vm>/<gen:06d>.json    each generation's index
  state/<vm>/<gen:06d>.json          the server's state of it when it was exported

The chunks are encrypted to the site's backup key: reading them needs the recovery (paper) key,
which is not here. To put these generations on a backup server (an empty one made with
`kasou backup-server init`, or an existing one):

  kasou backup-server import --dir /var/lib/kasou-backup --from {path}

The import checks every chunk against its SHA-256 and locks each generation by the receiving
server's own policy. Then restore from that server as usual.
"""


@dataclass
class Copied:
    generations: list[tuple[str, int]] = field(default_factory=list)
    chunks: int = 0
    chunk_bytes: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # vm, generation, why


def _chunk_file(root: Path, chunk_id: str) -> Path:
    validate_chunk_id(chunk_id)
    return root / "chunks" / chunk_id[:4] / chunk_id


def _sound(data: bytes) -> bool:
    return len(data) > HASH_LEN and hmac.compare_digest(data[:HASH_LEN], hashlib.sha256(data[HASH_LEN:]).digest())


def export(store: Store, to: Path, vm: str | None = None) -> Copied:
    """Copy the generations (of ``vm``) to ``to``; a generation with a damaged chunk here is skipped and
    reported."""
    to = Path(to)
    if (to / "server.json").exists():
        raise InvalidSpec(f"{to} is a backup server's data directory, not export media", field="to")
    vms = [validate_name(vm, "vm")] if vm else store.vms()
    if vm and not store.generation_numbers(vm):
        raise NotFound(f"no generations of {vm}")
    for sub in ("chunks", "generations", "state"):
        (to / sub).mkdir(parents=True, exist_ok=True)
    res = Copied()
    for name in vms:
        for gen in store.generation_numbers(name):
            target = to / "generations" / name / gen_name(gen)
            if target.exists():
                continue
            index = store.index(name, gen)
            try:
                for cid in sorted(chunk_ids(index)):
                    dest = _chunk_file(to, cid)
                    if dest.exists() and _sound(dest.read_bytes()):
                        continue
                    data = store.chunk_path(cid).read_bytes() if store.has_chunk(cid) else b""
                    if not _sound(data):
                        raise BackupCorrupt(f"chunk {cid} is missing or damaged here")
                    dest.parent.mkdir(exist_ok=True)
                    atomic_write(dest, data)
                    res.chunks += 1
                    res.chunk_bytes += len(data) - HASH_LEN
            except KasouError as e:
                res.skipped.append((name, gen, e.message))
                continue
            (to / "state" / name).mkdir(exist_ok=True)
            write_json(to / "state" / name / gen_name(gen), store.state(name, gen))
            target.parent.mkdir(exist_ok=True)
            atomic_write(target, store.index_path(name, gen).read_bytes())  # last: its presence says it is whole
            res.generations.append((name, gen))
    info = store.info()
    held = [(p.parent.name, p.stem) for p in (to / "generations").glob("*/*.json")]
    meta = {"server_id": info["server_id"], "name": info["name"], "exported": store.clock(), "generations": len(held)}
    write_json(to / "export.json", meta)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta["exported"]))
    text = README.format(name=info["name"], server_id=info["server_id"], when=when, count=len(held),
                         vms=len({v for v, _ in held}), path=to)  # fmt: skip
    atomic_write(to / "README.txt", text.encode(), mode=0o644)
    store.event("exported", to=str(to), generations=len(res.generations), chunks=res.chunks,
                skipped=len(res.skipped))  # fmt: skip
    return res


def _first_received(src: Path, vm: str, generation: int) -> float | None:
    """When the exporting server (or its own primary) received the generation, from the media's state file."""
    try:
        state = read_json(src / "state" / vm / gen_name(generation))
    except (OSError, ValueError):
        return None
    synced = state.get("synced_from") or {}
    first = synced.get("received") if isinstance(synced, dict) else None
    value = first if first is not None else state.get("received")
    return float(value) if isinstance(value, (int, float)) else None


def import_from(store: Store, src: Path, vm: str | None = None) -> Copied:
    """Add every generation found under ``src`` that this server does not hold."""
    src = Path(src)
    if not (src / "generations").is_dir():
        raise NotFound(f"{src} holds no exported generations (no generations/ directory)")
    meta: dict[str, Any] = {}
    if (src / "export.json").is_file():
        meta = read_json(src / "export.json")
    res = Copied()
    for path in sorted((src / "generations").glob("*/*.json")):
        name = path.parent.name
        if vm and name != vm:
            continue
        try:
            index = validate_index(json.loads(path.read_bytes()))
            gen = index["generation"]
            if index["vm"] != name or path.name != gen_name(gen):
                raise BackupCorrupt(f"{path} holds generation {gen} of {index['vm']}")
        except (KasouError, ValueError) as e:
            res.skipped.append((name, -1, f"{path.name}: {getattr(e, 'message', e)}"))
            continue
        if store.has_generation(name, gen):
            continue
        try:
            for cid in store.missing(sorted(chunk_ids(index))):
                f = _chunk_file(src, cid)
                data = f.read_bytes() if f.is_file() else b""
                if not _sound(data):
                    raise BackupCorrupt(f"chunk {cid} is missing or damaged in {src}")
                if store.put_chunk(cid, data[HASH_LEN:]):
                    res.chunks += 1
                    res.chunk_bytes += len(data) - HASH_LEN
            origin = {"import": str(src), "server_id": meta.get("server_id"), "at": store.clock(),
                      "received": _first_received(src, name, gen)}  # fmt: skip
            policy.add_generation(store, index, synced_from=origin)
        except KasouError as e:
            res.skipped.append((name, gen, e.message))
            continue
        res.generations.append((name, gen))
    store.event("imported", source=str(src), generations=len(res.generations), chunks=res.chunks,
                skipped=len(res.skipped))  # fmt: skip
    return res
