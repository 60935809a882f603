"""Guest images: building them from Debian packages, importing disks, finding them.

An image lives in ``images_dir/<name>/``: a disk, ``manifest.json`` (written last, so a
directory with a readable manifest is a complete image) and, for an image QEMU boots by its
kernel (``tiny``), that kernel and its initramfs. Two recipes build images from Debian's
packages: ``tiny`` (a busybox initramfs, :mod:`kasou.image.tiny`) and ``debian`` (Debian 12
with systemd on a GPT disk that boots with BIOS or UEFI, :mod:`kasou.image.debian`). Any other
disk file is brought in with :func:`import_image`. Builds happen in a temporary directory
beside the target and are renamed into place; a lock file serialises builders of one image.

::

    art = build_image(Path("/var/lib/kasou/images"))          # cached after the first time
    art = build_image(Path("/var/lib/kasou/images"), "debian")
    art = load_image(Path("/var/lib/kasou/images"), "tiny")   # ImageNotFound if not built
    art = import_image(Path("/var/lib/kasou/images"), "emr", Path("emr.qcow2"))
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from kasou.errors import ImageError, ImageNotFound, InvalidSpec, KasouError
from kasou.image import debian, tiny
from kasou.image.importing import import_disk
from kasou.image.manifest import (
    MANIFEST_NAME,
    ImageArtifacts,
    image_lock,
    list_images,
    read_image,
    remove_leftovers,
    replace_dir,
    write_manifest,
)
from kasou.image.tools import mounts_under
from kasou.model.names import validate_name

__all__ = [
    "KNOWN_IMAGES",
    "MANIFEST_NAME",
    "ImageArtifacts",
    "build_image",
    "delete_image",
    "import_image",
    "list_images",
    "load_image",
]

#: Each image's recipe: a module whose ``build(dest, cache_dir, progress)``
#: fills ``dest`` and returns what goes into the manifest.
_RECIPES = {"tiny": tiny, "debian": debian}
#: The images ``kasou image build`` makes (any other name is an imported image).
KNOWN_IMAGES: tuple[str, ...] = tuple(_RECIPES)


def _how_to_make(name: str) -> str:
    if name in _RECIPES:
        return f"rebuild it with: kasou image build {name} --force"
    return f"delete it (kasou image delete {name}) and import it again"


def load_image(images_dir: Path, name: str) -> ImageArtifacts:
    """The built or imported image ``name`` in ``images_dir``.

    Raises :class:`ImageNotFound` if it is unknown or not built, and
    :class:`ImageError` if its manifest is damaged or names missing files.
    """
    try:
        validate_name(name, "image")
        return read_image(images_dir, name, rebuild=_how_to_make(name))
    except (ImageNotFound, InvalidSpec):
        if name in _RECIPES:
            raise ImageNotFound(f"image '{name}' is not built; run: kasou image build {name}", image=name) from None
        there = ", ".join(a.name for a in list_images(images_dir)) or "none"
        raise ImageNotFound(
            f"unknown image '{name}' (images here: {there}; build one of {', '.join(KNOWN_IMAGES)} "
            "with kasou image build, or import a disk with kasou image import)",
            image=name,
        ) from None


def import_image(
    images_dir: Path,
    name: str,
    source: Path,
    *,
    firmware: Sequence[str] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> ImageArtifacts:
    """Register the disk file ``source`` (qcow2 or raw) as the image ``name`` (see :mod:`kasou.image.importing`).

    The names of the images kasou builds are refused, as is a name in use.
    """
    return import_disk(images_dir, name, source, reserved=KNOWN_IMAGES, firmware=firmware, progress=progress)


def delete_image(images_dir: Path, name: str) -> None:
    """Remove the image ``name`` (VMs made from it keep their own copies of its disk)."""
    art = load_image(images_dir, name)
    with image_lock(Path(images_dir).absolute(), name):
        shutil.rmtree(art.root)


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
    if name not in _RECIPES:
        raise ImageNotFound(
            f"unknown image '{name}'; kasou builds {', '.join(KNOWN_IMAGES)} (a disk of your own: kasou image import)",
            image=name,
        )
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

    with image_lock(images_dir, name):
        if not force:
            # Someone else may have finished it while we waited for the lock.
            with contextlib.suppress(KasouError):
                art = load_image(images_dir, name)
                report("already built", 1.0)
                return art
        remove_leftovers(images_dir, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=images_dir))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; QEMU may run as another user
            build = _RECIPES[name].build(tmp, images_dir / ".cache", report)
            report("writing the manifest", 0.97)
            write_manifest(tmp, name, asdict(build))
            replace_dir(images_dir, name, tmp)
        except ImageError:
            raise
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise ImageError(f"building image '{name}' failed: {exc}") from exc
        finally:
            if not mounts_under(tmp):  # never descend into a file system a failed build left mounted
                shutil.rmtree(tmp, ignore_errors=True)
    art = load_image(images_dir, name)
    report("done", 1.0)
    return art
