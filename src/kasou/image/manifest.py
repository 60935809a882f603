"""The images directory: one directory per image, its ``manifest.json`` written last.

``images_dir/<name>/manifest.json`` says what the image is: its disk (and, for an image that
boots by a kernel QEMU loads, that kernel, its initramfs and arguments), the firmware it boots
with and when it was made. A directory whose manifest reads is a complete image; anything else
in the images directory (``.cache``, locks, the temporary directories of builds under way) is
not an image. Builds and imports write into a temporary directory beside the target, hold
:func:`image_lock` and rename it into place, so a reader never sees half an image.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasou.errors import ImageError, ImageNotFound, InvalidSpec
from kasou.model.names import validate_name

__all__ = [
    "FIRMWARES",
    "LOCK_TIMEOUT_S",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ImageArtifacts",
    "image_lock",
    "list_images",
    "read_image",
    "remove_leftovers",
    "replace_dir",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
#: How long a builder waits for another process building (or importing) the same image.
LOCK_TIMEOUT_S = 900.0
#: The firmware an image may boot with: SeaBIOS, OVMF, OVMF with Secure Boot enforcing.
FIRMWARES = ("bios", "uefi", "uefi-secure")


@dataclass(frozen=True)
class ImageArtifacts:
    """An image: where its files are and how to boot it.

    ``kernel`` and ``initrd`` are set for an image that QEMU boots directly (``-kernel``, the
    ``tiny`` guest); an image whose disk carries its own boot loader has neither, and the
    firmware boots its disk.
    """

    name: str
    root: Path
    kernel: Path | None
    initrd: Path | None
    disk: Path
    disk_format: str
    disk_size_bytes: int
    kernel_args: str
    firmware: tuple[str, ...] = ("bios",)
    #: ``built`` by a recipe (``kasou image build``) or ``imported`` (``kasou image import``).
    origin: str = "built"
    #: The least memory its OS boots in (0: no minimum recorded); ``vm create`` refuses less.
    min_memory_mib: int = 0
    #: When it was built or imported (UTC, ISO 8601); not part of what makes two images equal.
    built_at: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as absolute strings)."""
        return {
            "name": self.name,
            "root": str(self.root),
            "kernel": None if self.kernel is None else str(self.kernel),
            "initrd": None if self.initrd is None else str(self.initrd),
            "disk": str(self.disk),
            "disk_format": self.disk_format,
            "disk_size_bytes": self.disk_size_bytes,
            "kernel_args": self.kernel_args,
            "firmware": list(self.firmware),
            "origin": self.origin,
            "min_memory_mib": self.min_memory_mib,
            "built_at": self.built_at,
        }


def _optional_file(root: Path, value: object) -> Path | None:
    return None if value is None else root / str(value)


def read_image(images_dir: Path, name: str, *, rebuild: str) -> ImageArtifacts:
    """The image ``name`` as its manifest describes it.

    Raises :class:`ImageNotFound` if it has no manifest, and :class:`ImageError` (ending in
    ``rebuild``, how to make it again) if the manifest is damaged or names missing files.
    """
    root = Path(images_dir).absolute() / name
    manifest = root / MANIFEST_NAME
    try:
        text = manifest.read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageNotFound(f"image '{name}' does not exist", image=name) from None
    except OSError as exc:
        raise ImageError(f"cannot read {manifest}: {exc.strerror}", image=name) from exc
    try:
        data = json.loads(text)
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('manifest_version')!r}")
        firmware = tuple(str(f) for f in data.get("firmware", ["bios"]))
        if not firmware or any(f not in FIRMWARES for f in firmware):
            raise ValueError(f"firmware {list(firmware)!r}")
        art = ImageArtifacts(
            name=str(data["name"]),
            root=root,
            kernel=_optional_file(root, data["kernel"]),
            initrd=_optional_file(root, data["initrd"]),
            disk=root / str(data["disk"]),
            disk_format=str(data["disk_format"]),
            disk_size_bytes=int(data["disk_size_bytes"]),
            kernel_args=str(data["kernel_args"]),
            firmware=firmware,
            origin=str(data.get("origin", "built")),
            min_memory_mib=int(data.get("min_memory_mib", 0)),
            built_at=str(data.get("built_at", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"image '{name}' has a damaged manifest ({exc}); {rebuild}") from exc
    if art.name != name:
        raise ImageError(f"image '{name}' manifest names image '{art.name}'; {rebuild}")
    if (art.kernel is None) != (art.initrd is None):
        raise ImageError(f"image '{name}' has a damaged manifest (a kernel without initrd); {rebuild}")
    for path in (art.kernel, art.initrd, art.disk):
        if path is not None and not path.is_file():
            raise ImageError(f"image '{name}' is missing {path.name}; {rebuild}", image=name)
    return art


def list_images(images_dir: Path) -> list[ImageArtifacts]:
    """Every complete image in ``images_dir``, by name (damaged ones are left out)."""
    images_dir = Path(images_dir)
    found = []
    with contextlib.suppress(OSError):
        for entry in sorted(images_dir.iterdir()):
            try:
                validate_name(entry.name, "image")
                found.append(read_image(images_dir, entry.name, rebuild=""))
            except (InvalidSpec, ImageError):
                continue
    return found


def write_manifest(root: Path, name: str, fields: Mapping[str, Any]) -> None:
    """Write ``root/manifest.json`` (fsync'd, renamed into place): the last step of a build or import."""
    data = {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        **fields,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = root / (MANIFEST_NAME + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST_NAME)


@contextlib.contextmanager
def image_lock(images_dir: Path, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialise the builders and importers of one image (other processes included), bounded wait."""
    lock_path = images_dir / f".{name}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ImageError(f"cannot create {lock_path}: {exc.strerror}") from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise ImageError(
                        f"another build of image '{name}' has held {lock_path} for {timeout:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(images_dir: Path, name: str) -> None:
    """Temporary directories of builds or imports of ``name`` that died (call it holding the lock)."""
    for pattern in (f".{name}.build-*", f".{name}.old-*", f".{name}.import-*"):
        for path in images_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def replace_dir(images_dir: Path, name: str, tmp: Path) -> None:
    """Move the finished ``tmp`` to ``images_dir/name``, replacing an older one (holding the lock)."""
    target = images_dir / name
    if target.exists() or target.is_symlink():
        old = images_dir / f".{name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)
