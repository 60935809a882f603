"""Guest images: building them from Debian packages, and finding built ones.

An image lives in ``images_dir/<name>/``: a kernel, an initramfs, a disk and
``manifest.json``, which is written last, so a directory with a readable
manifest is a complete build. Builds happen in a temporary directory beside
the target and are renamed into place; a lock file serialises builders of the
same image.

::

    art = build_image(Path("/var/lib/kasou/images"))        # cached after the first time
    art = load_image(Path("/var/lib/kasou/images"), "tiny") # ImageNotFound if not built
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kasou.errors import ImageError, ImageNotFound, KasouError
from kasou.image import tiny

__all__ = [
    "KNOWN_IMAGES",
    "MANIFEST_NAME",
    "ImageArtifacts",
    "build_image",
    "load_image",
]

#: Each image's recipe: a module whose ``build(dest, cache_dir, progress)``
#: fills ``dest`` and returns what goes into the manifest.
_RECIPES = {"tiny": tiny}
KNOWN_IMAGES: tuple[str, ...] = tuple(_RECIPES)
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
#: How long a builder waits for another process building the same image.
LOCK_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ImageArtifacts:
    """A built image: where its files are and how to boot it."""

    name: str
    root: Path
    kernel: Path
    initrd: Path
    disk: Path
    disk_format: str
    disk_size_bytes: int
    kernel_args: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as absolute strings)."""
        data = asdict(self)
        for key in ("root", "kernel", "initrd", "disk"):
            data[key] = str(data[key])
        return data


def _check_name(name: str) -> None:
    if name not in KNOWN_IMAGES:
        known = ", ".join(KNOWN_IMAGES)
        raise ImageNotFound(f"unknown image '{name}'; known images: {known}", image=name)


def load_image(images_dir: Path, name: str) -> ImageArtifacts:
    """The built image ``name`` in ``images_dir``.

    Raises :class:`ImageNotFound` if it is unknown or not built, and
    :class:`ImageError` if its manifest is damaged or names missing files.
    """
    _check_name(name)
    root = Path(images_dir).absolute() / name
    manifest = root / MANIFEST_NAME
    try:
        text = manifest.read_text()
    except FileNotFoundError:
        raise ImageNotFound(f"image '{name}' is not built; run: kasou image build {name}", image=name) from None
    except OSError as exc:
        raise ImageError(f"cannot read {manifest}: {exc.strerror}", image=name) from exc
    rebuild = f"rebuild it with: kasou image build {name} --force"
    try:
        data = json.loads(text)
        if data.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('manifest_version')!r}")
        art = ImageArtifacts(
            name=str(data["name"]),
            root=root,
            kernel=root / str(data["kernel"]),
            initrd=root / str(data["initrd"]),
            disk=root / str(data["disk"]),
            disk_format=str(data["disk_format"]),
            disk_size_bytes=int(data["disk_size_bytes"]),
            kernel_args=str(data["kernel_args"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"image '{name}' has a damaged manifest ({exc}); {rebuild}") from exc
    if art.name != name:
        raise ImageError(f"image '{name}' manifest names image '{art.name}'; {rebuild}")
    for path in (art.kernel, art.initrd, art.disk):
        if not path.is_file():
            raise ImageError(f"image '{name}' is missing {path.name}; {rebuild}", image=name)
    return art


def _write_manifest(root: Path, name: str, build: tiny.TinyBuild) -> None:
    data = {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        **asdict(build),
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
def _build_lock(images_dir: Path, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialise builders of one image (other processes included), bounded wait."""
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


def _remove_leftovers(images_dir: Path, name: str) -> None:
    """Temp dirs of builds that died (only called while holding the lock)."""
    for pattern in (f".{name}.build-*", f".{name}.old-*"):
        for path in images_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def build_image(
    images_dir: Path,
    name: str = "tiny",
    *,
    force: bool = False,
    progress: Callable[[str, float], None] | None = None,
) -> ImageArtifacts:
    """Build image ``name`` into ``images_dir/name/`` (or return the cached build).

    A complete build (one with a readable manifest) is returned as it is
    unless ``force``. ``progress(step, fraction)`` is called as steps go,
    ending with fraction 1.0. Failures raise :class:`ImageError` with a
    one-line reason and leave no temporary directory behind; an unknown
    name raises :class:`ImageNotFound`.

    Note: ``force`` replaces the image's disk. VM disks that are copies of it
    are unaffected; qcow2 overlays backed by it would see a different disk.
    """
    _check_name(name)
    report = progress or (lambda _step, _fraction: None)
    images_dir = Path(images_dir).absolute()
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create {images_dir}: {exc.strerror}") from exc

    if not force:
        with contextlib.suppress(KasouError):
            art = load_image(images_dir, name)
            report("already built", 1.0)
            return art

    with _build_lock(images_dir, name):
        if not force:
            # Someone else may have finished it while we waited for the lock.
            with contextlib.suppress(KasouError):
                art = load_image(images_dir, name)
                report("already built", 1.0)
                return art
        _remove_leftovers(images_dir, name)
        target = images_dir / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=images_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; QEMU may run as another user
            build = _RECIPES[name].build(tmp, images_dir / ".cache", report)
            report("writing the manifest", 0.97)
            _write_manifest(tmp, name, build)
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
        except ImageError:
            raise
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise ImageError(f"building image '{name}' failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    art = load_image(images_dir, name)
    report("done", 1.0)
    return art
