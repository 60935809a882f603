"""OVA archives and OVF manifests: reading one without extracting it, writing one, checking digests.

An OVA is an uncompressed tar (ustar) of an OVF descriptor (first), its manifest and its disk files.
kasou never extracts one: it lists the members, refuses the whole archive if any member could land
outside a directory when extracted (an absolute name, ``..``, a link, a device, a sparse member),
reads the descriptor and manifest into memory (bounded) and hands qemu-img each disk as a byte range
of the archive (:func:`member_source`), so importing a 100 GiB OVA copies nothing first.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kasou.errors import ImageError, InvalidSpec
from kasou.model.ovf import clean

MAX_MEMBERS = 1000
MAX_MANIFEST_BYTES = 1024 * 1024
DIGESTS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\((.{1,255})\)\s*=\s*([0-9a-fA-F]{40,128})\s*$")
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # where its bytes start in the archive
    size: int


def members(path: Path) -> dict[str, Member]:
    """The regular files of an OVA, by name; InvalidSpec if the archive is not a plain tar or any member
    is unsafe (its name leaves the archive, it is a link or a device)."""
    shown = path.name
    out: dict[str, Member] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:": uncompressed only, as OVF requires
            for n, m in enumerate(tar):
                if n >= MAX_MEMBERS:
                    raise InvalidSpec(f"{shown} has more than {MAX_MEMBERS} members; no OVA has", field="ova")
                name = check_member_name(m.name, shown)
                if m.isdir():
                    continue
                if not m.isfile() or m.issparse():
                    what = "a link" if m.issym() or m.islnk() else "not a regular file"
                    raise InvalidSpec(f"{shown}: member {clean(m.name)!r} is {what}; an OVA holds files only",
                                      field="ova")  # fmt: skip
                if name in out:
                    raise InvalidSpec(f"{shown}: member {clean(m.name)!r} is there twice", field="ova")
                out[name] = Member(name=name, offset=m.offset_data, size=m.size)
    except tarfile.TarError as e:
        raise InvalidSpec(f"{shown} is not an OVA (a tar archive): {clean(str(e))}", field="ova") from None
    except OSError as e:
        raise InvalidSpec(f"cannot read {shown}: {e.strerror}", field="ova") from None
    if not out:
        raise InvalidSpec(f"{shown} is empty or not an OVA (a tar archive)", field="ova")
    return out


def check_member_name(name: str, archive: str) -> str:
    """A member's name, normalised (``./a.vmdk`` is ``a.vmdk``); InvalidSpec if it would leave the archive."""
    p = PurePosixPath(name)
    if not name or name.startswith("/") or "\\" in name or "\0" in name or ".." in p.parts:
        raise InvalidSpec(f"{archive}: member {clean(name)!r} would land outside the archive's directory; "
                          "the OVA is refused", field="ova")  # fmt: skip
    parts = [x for x in p.parts if x not in ("", ".")]
    return "/".join(parts)


def read_member(path: Path, m: Member, limit: int) -> bytes:
    if m.size > limit:
        raise InvalidSpec(f"{path.name}: {clean(m.name)!r} is {m.size} bytes; at most {limit} are read", field="ova")
    with open(path, "rb") as f:
        f.seek(m.offset)
        data = f.read(m.size)
    if len(data) != m.size:
        raise InvalidSpec(f"{path.name} is cut short: {clean(m.name)!r} is incomplete", field="ova")
    return data


def parse_manifest(data: bytes, where: str) -> dict[str, tuple[str, str]]:
    """An OVF manifest (``SHA256(file)= hex`` lines): file -> (hashlib name, hex digest)."""
    out: dict[str, tuple[str, str]] = {}
    for ln in data.decode("utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        m = _MANIFEST_LINE.match(ln.strip())
        if m is None:
            raise InvalidSpec(f"{where}: the manifest has a line kasou cannot read: {clean(ln)!r}", field="ova")
        algo = DIGESTS[m.group(1)]
        if len(m.group(3)) != hashlib.new(algo).digest_size * 2:
            raise InvalidSpec(f"{where}: the manifest's {m.group(1)} of {clean(m.group(2))!r} has the wrong length",
                              field="ova")  # fmt: skip
        out[m.group(2)] = (algo, m.group(3).lower())
    return out


def check_digest(data: bytes, name: str, digest: tuple[str, str] | None, where: str) -> None:
    if digest is not None and hashlib.new(digest[0], data).hexdigest() != digest[1]:
        raise InvalidSpec(f"{where}: {clean(name)!r} does not match the manifest ({digest[0].upper()})", field="ova")


def hash_range(path: Path, offset: int, length: int, algo: str, progress: Callable[[float], None] | None = None) -> str:
    """The digest of ``length`` bytes of ``path`` from ``offset`` (runs in a thread: it reads the whole range)."""
    h = hashlib.new(algo)
    left = length
    last = 0.0
    with open(path, "rb") as f:
        f.seek(offset)
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise ImageError(f"{path.name} is cut short ({length - left} of {length} bytes)")
            h.update(chunk)
            left -= len(chunk)
            now = time.monotonic()
            if progress is not None and now - last > 0.2:
                last = now
                progress(1 - left / length if length else 1.0)
    return h.hexdigest()


def write_ova(target: Path, files: list[tuple[str, Path]]) -> int:
    """A ustar archive of ``files`` (name in the archive, file) in the order given; returns its size.
    Written to ``target`` (which must not exist) through a temporary name, so it appears complete or not at all."""
    part = target.with_name(f".{target.name}.part")
    try:
        with tarfile.open(part, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            now = int(time.time())
            for name, f in files:
                info = tarfile.TarInfo(name)
                info.size = f.stat().st_size
                info.mode, info.mtime, info.uname, info.gname = 0o644, now, "kasou", "kasou"
                with open(f, "rb") as src:
                    tar.addfile(info, src)
        os.link(part, target)  # fails if the target appeared meanwhile: nothing is overwritten
        return target.stat().st_size
    except FileExistsError:
        raise InvalidSpec(f"{target.name} already exists; choose another name", field="ova") from None
    finally:
        part.unlink(missing_ok=True)
