"""What a host finds in the files to import: each disk's format and size, an OVA's or OVF's descriptor.

The files are untrusted: a disk image can name other files (a qcow2 backing file or external data
file, the extents of a vmdk descriptor) that qemu-img would read into the new disk, so that a crafted
"disk" could copy the host's own files into a guest. kasou therefore

- takes only files in the host's transfer directory (``KASOU_TRANSFER_DIR``; symbolic links that lead
  out of it are refused),
- decides the format from the file's own header, checked against its name (``x.vmdk`` must be a
  vmdk), and always names it to qemu-img (``-f``), so qemu never guesses,
- reads a qcow2 header and a vmdk descriptor itself before qemu-img opens them, and refuses backing
  files, external data files and extents that are not plain files beside the descriptor,
- and checks what ``qemu-img info`` then reports (no backing file, every extent inside).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from kasou.agent import ova
from kasou.errors import ImageError, InvalidSpec, NotFound
from kasou.hypervisor import imagefiles
from kasou.model.imports import DiskFormat, ImportInspect, ImportSource, SourceDisk
from kasou.model.ovf import MAX_DESCRIPTOR_BYTES, clean, parse_ovf

#: The format a file's name promises; ``.img`` promises nothing (raw or qcow2 both use it).
BY_SUFFIX: dict[str, DiskFormat] = {".qcow2": "qcow2", ".qcow": "qcow2", ".raw": "raw", ".vmdk": "vmdk",
                                    ".vhd": "vpc", ".vpc": "vpc", ".vhdx": "vhdx"}  # fmt: skip
DESCRIPTOR = "vmdk-descriptor"  # a vmdk text descriptor whose data is in extent files
INFO_TIMEOUT = 60.0
_EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+\d+\s+([A-Z]+)(?:\s+"([^"]*)")?', re.MULTILINE)
_CREATE_TYPE = re.compile(r'^\s*createType\s*=\s*"([^"]*)"', re.MULTILINE)


def sniff(head: bytes, tail: bytes) -> str:
    """A disk format from a file's first and last bytes (qemu's own magic numbers); ``raw`` if none."""
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] in (b"KDMV", b"COWD"):
        return "vmdk"
    if head.startswith(b"# Disk DescriptorFile"):
        return DESCRIPTOR
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix" or tail[-512:][:8] == b"conectix":  # a fixed VHD has its footer only at the end
        return "vpc"
    return "raw"


def check_qcow2_header(head: bytes, shown: str) -> None:
    """Refuse a qcow2 that names another file (read from its header, before qemu-img opens it)."""
    if len(head) < 104:
        raise InvalidSpec(f"{shown} is cut short: its qcow2 header is incomplete", field="disks")
    version, backing_offset = struct.unpack(">IQ", head[4:16])
    if backing_offset != 0:
        raise InvalidSpec(f"{shown} is a qcow2 overlay with a backing file; import a self-contained image "
                          "(qemu-img convert it first)", field="disks")  # fmt: skip
    if version >= 3 and struct.unpack(">Q", head[72:80])[0] & 4:
        raise InvalidSpec(f"{shown} keeps its data in an external file; import a self-contained image",
                          field="disks")  # fmt: skip


def _read_ends(path: Path, offset: int = 0, length: int | None = None) -> tuple[bytes, bytes]:
    size = length if length is not None else path.stat().st_size
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(min(size, 4096))
        f.seek(offset + max(0, size - 512))
        tail = f.read(min(size, 512))
    return head, tail


class Sources:
    """The files of one host's transfer directory that can be imported."""

    def __init__(self, transfer_dir: Path, host: str = "this host") -> None:
        self.transfer_dir = transfer_dir
        self.host = host

    def root(self) -> Path:
        return self.transfer_dir.resolve()

    def resolve(self, path: str, what: str = "file") -> Path:
        """``path`` (relative: in the transfer directory) as a file inside it; InvalidSpec or NotFound if not."""
        p = Path(path)
        full = p if p.is_absolute() else self.transfer_dir / p
        root = self.root()
        real = Path(os.path.realpath(full))
        if real != root and root not in real.parents:
            raise InvalidSpec(f"{path} is not in the transfer directory of host {self.host} ({self.transfer_dir}); "
                              "put the files to import there (KASOU_TRANSFER_DIR)", field="disks")  # fmt: skip
        if not real.exists():
            raise NotFound(f"no {what} {path} in the transfer directory of host {self.host} ({self.transfer_dir})")
        if not real.is_file():
            raise InvalidSpec(f"{path} is not a file", field="disks")
        return real

    def new_file(self, path: str) -> Path:
        """Where a new file named ``path`` goes (an export); InvalidSpec if outside or already there."""
        p = Path(path)
        full = p if p.is_absolute() else self.transfer_dir / p
        root = self.root()
        parent = Path(os.path.realpath(full.parent))
        if parent != root and root not in parent.parents:
            raise InvalidSpec(f"{path} is not in the transfer directory of host {self.host} ({self.transfer_dir})",
                              field="ova")  # fmt: skip
        if not parent.is_dir():
            raise InvalidSpec(f"directory {full.parent} does not exist on host {self.host}", field="ova")
        target = parent / full.name
        if not full.name.endswith(".ova"):
            raise InvalidSpec(f"{full.name}: an OVA's name ends in .ova", field="ova")
        if os.path.lexists(target):
            raise InvalidSpec(f"{path} already exists on host {self.host}; choose another name", field="ova")
        return target

    # -- inspection -------------------------------------------------------------------------------

    async def inspect(self, req: ImportInspect) -> ImportSource:
        if req.ova is not None:
            return await self._ova(req.ova)
        if req.ovf is not None:
            return await self._ovf(req.ovf)
        if not req.disks:
            raise InvalidSpec("no disk to import", field="disks")
        return ImportSource(kind="disks", disks=[await self.disk_file(d) for d in req.disks])

    async def disk_file(self, given: str, digest: tuple[str, str] | None = None) -> SourceDisk:
        """One disk file: its format from its header (checked against its name), size and extents."""
        path = self.resolve(given, "disk file")
        head, tail = _read_ends(path)
        found = sniff(head, tail)
        fmt = _expected_format(given, found)
        if fmt == "qcow2":
            check_qcow2_header(head, given)
        if found == DESCRIPTOR:
            _check_descriptor(path, given)
        if fmt == "raw" and (path.stat().st_size % 512 or path.stat().st_size == 0):
            raise InvalidSpec(f"{given} is no disk image: its size, {path.stat().st_size} bytes, is not a whole "
                              "number of 512-byte sectors", field="disks")  # fmt: skip
        data = await self._info(str(path), fmt, given)
        self._check_info(data, given, path.parent)
        return SourceDisk(
            file=given, path=str(path), format=fmt, subformat=_subformat(data),
            virtual_size=int(data["virtual-size"]), file_bytes=_file_bytes(data, path),
            digest=f"{digest[0]}:{digest[1]}" if digest else None,
        )  # fmt: skip

    async def _member_disk(self, archive: Path, m: ova.Member, href: str, digest: tuple[str, str] | None) -> SourceDisk:
        shown = f"{archive.name}:{m.name}"
        head, tail = _read_ends(archive, m.offset, m.size)
        found = sniff(head, tail)
        if found == DESCRIPTOR:
            raise InvalidSpec(f"{shown} is a vmdk descriptor whose data lies in other files; kasou imports "
                              "monolithic and streamOptimized vmdk from an OVA", field="ova")  # fmt: skip
        fmt = _expected_format(m.name, found)
        if fmt == "qcow2":
            check_qcow2_header(head, shown)
        data = await self._info(member_source(archive, m, fmt), fmt, shown)
        self._check_info(data, shown, None)
        return SourceDisk(
            file=href, path=str(archive), member=m.name, offset=m.offset, length=m.size, format=fmt,
            subformat=_subformat(data), virtual_size=int(data["virtual-size"]), file_bytes=m.size,
            digest=f"{digest[0]}:{digest[1]}" if digest else None,
        )  # fmt: skip

    async def _info(self, source: str, fmt: str, shown: str) -> dict[str, Any]:
        args = ["qemu-img", "info", "--output=json", "-U"]
        args += [source] if source.startswith("json:") else ["-f", fmt, source]
        try:
            data: dict[str, Any] = json.loads(await imagefiles.run(*args, timeout=INFO_TIMEOUT))
        except ImageError as e:
            raise InvalidSpec(f"{shown} cannot be read as a {_name(fmt)} image: {e.message}", field="disks") from None
        return data

    def _check_info(self, data: dict[str, Any], shown: str, beside: Path | None) -> None:
        """What qemu-img found must name no other file than the extents beside a descriptor."""
        if data.get("backing-filename") or data.get("full-backing-filename"):
            raise InvalidSpec(f"{shown} has a backing file; import a self-contained image", field="disks")
        spec = (data.get("format-specific") or {}).get("data") or {}
        if spec.get("data-file"):
            raise InvalidSpec(f"{shown} keeps its data in an external file; import a self-contained image",
                              field="disks")  # fmt: skip
        if spec.get("parent-cid") not in (None, 0xFFFFFFFF):
            raise InvalidSpec(f"{shown} is a vmdk delta (a snapshot of a parent disk); consolidate it first",
                              field="disks")  # fmt: skip
        extents = spec.get("extents") or []
        if beside is None and len(extents) > 1:  # a member of an OVA: its one extent is itself
            raise InvalidSpec(f"{shown} names other files as its extents", field="disks")
        for ext in extents if beside is not None else []:
            name = str(ext.get("filename", ""))
            real = Path(os.path.realpath(name))
            if real.parent != beside:
                raise InvalidSpec(f"{shown} names extent {clean(name)!r} outside its own directory", field="disks")

    async def _ova(self, given: str) -> ImportSource:
        path = self.resolve(given, "OVA")
        found = ova.members(path)
        names = [n for n in found if n.lower().endswith(".ovf")]
        if not names:
            raise InvalidSpec(f"{given} holds no OVF descriptor (*.ovf)", field="ova")
        data = ova.read_member(path, found[names[0]], MAX_DESCRIPTOR_BYTES)
        mfs = [n for n in found if n.lower().endswith(".mf")]
        manifest = {}
        if mfs:
            manifest = ova.parse_manifest(ova.read_member(path, found[mfs[0]], ova.MAX_MANIFEST_BYTES), given)
        ova.check_digest(data, names[0], manifest.get(names[0]), given)
        env = parse_ovf(data)
        src = ImportSource(kind="ova", file=given, ovf=env, manifest=_manifest_note(manifest, mfs))
        for disk in env.disks:
            f = env.file(disk.file_ref) if disk.file_ref else None
            if f is None:
                continue
            name = ova.check_member_name(f.href, given)
            m = found.get(name)
            if m is None:
                raise InvalidSpec(f"{given} has no member {clean(f.href)!r}, the file of disk {disk.disk_id!r}",
                                  field="ova")  # fmt: skip
            src.ovf_disks[disk.disk_id] = await self._member_disk(path, m, f.href, manifest.get(name))
        return src

    async def _ovf(self, given: str) -> ImportSource:
        path = self.resolve(given, "OVF descriptor")
        if path.stat().st_size > MAX_DESCRIPTOR_BYTES:
            raise InvalidSpec(f"{given} is too large for an OVF descriptor", field="ovf")
        data = path.read_bytes()
        mf = path.with_suffix(".mf")
        manifest = ova.parse_manifest(mf.read_bytes()[: ova.MAX_MANIFEST_BYTES], mf.name) if mf.is_file() else {}
        ova.check_digest(data, path.name, manifest.get(path.name), given)
        env = parse_ovf(data)
        src = ImportSource(kind="ovf", file=given, ovf=env, manifest=_manifest_note(manifest, [mf.name] if
                                                                                    mf.is_file() else []))  # fmt: skip
        for disk in env.disks:
            f = env.file(disk.file_ref) if disk.file_ref else None
            if f is None:
                continue
            if "://" in f.href or f.href.startswith("/"):
                raise InvalidSpec(f"disk {disk.disk_id!r} names {clean(f.href)!r}; kasou reads only files beside "
                                  "the descriptor", field="ovf")  # fmt: skip
            name = ova.check_member_name(f.href, given)
            rel = str(Path(given).parent / name)
            try:
                src.ovf_disks[disk.disk_id] = await self.disk_file(rel, manifest.get(name))
            except NotFound:
                raise InvalidSpec(f"{clean(f.href)!r}, the file of disk {disk.disk_id!r}, is not beside {given}",
                                  field="ovf") from None  # fmt: skip
        return src


def member_source(archive: Path, m: ova.Member, fmt: str) -> str:
    """qemu's name for a disk that is a byte range of an archive (a ``raw`` node with offset and size)."""
    node: dict[str, Any] = {"driver": fmt, "file": {"driver": "raw", "offset": m.offset, "size": m.size,
                                                    "file": {"driver": "file", "filename": str(archive)}}}  # fmt: skip
    if fmt == "qcow2":
        node["backing"] = None  # never open a backing file, whatever the header says by the time it is read
    return "json:" + json.dumps(node)


def convert_source(src: SourceDisk) -> list[str]:
    """The source arguments of ``qemu-img convert`` for a disk to import: its format always named; a qcow2
    opened with no backing file at all (checked at the inspection, and ruled out again here)."""
    path = Path(src.path)
    if src.member is not None:
        return [member_source(path, ova.Member(name=src.member, offset=src.offset or 0, size=src.length or 0),
                              src.format)]  # fmt: skip
    if src.format == "qcow2":
        node = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}}
        return ["json:" + json.dumps(node)]
    return ["-f", src.format, str(path)]


def _manifest_note(manifest: dict[str, tuple[str, str]], files: list[str]) -> str | None:
    if not files:
        return None
    algos = sorted({a.upper() for a, _h in manifest.values()})
    return f"{files[0]}: {'/'.join(algos) or 'no'} digests of {len(manifest)} files, checked before each disk is read"


def _name(fmt: str) -> str:
    return {"vpc": "vhd"}.get(fmt, fmt)


def _expected_format(given: str, found: str) -> DiskFormat:
    """The format to read ``given`` as: its header's, if its name does not promise another."""
    suffix = Path(given).suffix.lower()
    want = BY_SUFFIX.get(suffix)
    actual: DiskFormat = "vmdk" if found == DESCRIPTOR else found  # type: ignore[assignment]
    if want == "raw":
        return "raw"  # a raw disk's bytes are the guest's: whatever they look like, they are not read as a format
    if want is not None and want != actual:
        if actual == "raw":
            raise InvalidSpec(f"{given} is not a {_name(want)} image: it has no {_name(want)} header (a corrupt "
                              "file, or no disk image)", field="disks")  # fmt: skip
        raise InvalidSpec(f"{given} is named .{suffix[1:]} but holds a {_name(actual)} image; rename it",
                          field="disks")  # fmt: skip
    if actual == "raw" and suffix != ".img":
        raise InvalidSpec(f"{given} is no disk image kasou recognises: it has no qcow2, vmdk, vhd or vhdx header "
                          "(a raw disk must be named *.raw or *.img)", field="disks")  # fmt: skip
    return actual


def _check_descriptor(path: Path, given: str) -> None:
    """A vmdk text descriptor: every extent a plain file beside it, and no parent (not a delta)."""
    text = path.read_bytes()[:65536].decode("utf-8", errors="replace")
    if re.search(r"^\s*parentFileNameHint\s*=", text, re.MULTILINE):
        raise InvalidSpec(f"{given} is a vmdk delta (a snapshot of a parent disk); consolidate it first",
                          field="disks")  # fmt: skip
    extents = _EXTENT.findall(text)
    if not extents:
        raise InvalidSpec(f"{given} is a vmdk descriptor that lists no extent", field="disks")
    for _access, kind, name in extents:
        if kind == "ZERO":
            continue
        if not name or "/" in name or "\\" in name or ":" in name or name in (".", ".."):
            raise InvalidSpec(f"{given} names extent {clean(name)!r}; its extents must be plain files beside it",
                              field="disks")  # fmt: skip
        if not (path.parent / name).is_file():
            raise InvalidSpec(f"{given} names extent {clean(name)!r}, which is missing", field="disks")


def _subformat(data: dict[str, Any]) -> str | None:
    spec = (data.get("format-specific") or {}).get("data") or {}
    sub = spec.get("create-type")
    return str(sub) if sub else None


def _file_bytes(data: dict[str, Any], path: Path) -> int:
    return int(data.get("actual-size") or path.stat().st_size)
