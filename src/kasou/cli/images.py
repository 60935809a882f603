"""``kasou image``: the guest images of this host (built from Debian's packages, or imported disks)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from kasou.cli.common import out, progress_bar
from kasou.cli.output import JSON, OUTPUT, Col, columns, render, view
from kasou.config import Paths
from kasou.model.units import format_size

image_app = typer.Typer(help="Guest images.", no_args_is_help=True)


def say(line: str) -> None:
    """One line, never wrapped (scripts read it)."""
    out.print(line, markup=False, highlight=False, soft_wrap=True)


@image_app.command("build")
def image_build(
    name: str = typer.Argument(..., help="tiny (a busybox test guest) or debian (Debian 12, BIOS and UEFI)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
) -> None:
    """Build a guest image from Debian packages (cached after the first build)."""
    from kasou.image import build_image

    paths = Paths.from_env()
    t0 = time.monotonic()
    with progress_bar(f"building image {name}") as update:
        art = build_image(paths.images, name, force=force, progress=lambda s, f: update(f, s))
    held = _held(art.disk)
    took = time.monotonic() - t0
    how = "cached" if took < 1 and not force else f"built in {took:.0f} s"
    say(f"image {art.name}: {art.root} ({how}; disk {format_size(art.disk_size_bytes)} {art.disk_format}, "
        f"file {format_size(held)}; firmware {', '.join(art.firmware)})")  # fmt: skip


IMAGE_COLS = [
    Col("name"), Col("kind"), Col("disk_format", "format"),
    Col("disk_size_bytes", "size", lambda a: format_size(a["disk_size_bytes"])),
    Col("file_bytes", "on disk", lambda a: format_size(a["file_bytes"])),
    Col("firmware", text=lambda a: " ".join(a["firmware"]) or "-"),
    Col("built_at", "made (UTC)", lambda a: f"{a['origin']} {a['built_at'][:16].replace('T', ' ')}"),
    Col("origin", hidden=True),
]  # fmt: skip


@image_app.command("list")
def image_list(output: str = OUTPUT, column: list[str] = columns(IMAGE_COLS), as_json: bool = JSON) -> None:
    """The images of this host: built and imported."""
    from kasou.image import list_images

    v = view(output, column, as_json, IMAGE_COLS)
    found = list_images(Paths.from_env().images)
    render([{**a.to_dict(), "file_bytes": _held(a.disk)} for a in found], IMAGE_COLS, v)


def _held(path: Path) -> int:
    """What a (sparse) disk file takes on its file system."""
    return path.stat().st_blocks * 512


@image_app.command("import")
def image_import(
    name: str,
    file: Path = typer.Argument(..., help="A qcow2 or raw disk file, or an ISO 9660 file (an installer disc)."),
    firmware: str = typer.Option(
        None, "--firmware", help="bios, uefi, uefi-secure (comma-separated); default: read from its partition table."
    ),
    kind: str = typer.Option(
        None, "--kind", help="disk or iso; default: iso for an ISO 9660 file (CD001 at 0x8001), else disk."
    ),
) -> None:
    """Register a disk file or an ISO as an image (a disk is copied as a thin qcow2, an ISO as it is; the file
    itself is left as it is). An ISO image goes in a VM's CD drive: kasou vm create --cdrom NAME."""
    from kasou.image import import_image
    from kasou.image.importing import parse_firmware

    fw = parse_firmware(firmware) if firmware is not None else None
    paths = Paths.from_env()
    with progress_bar(f"importing image {name}") as update:
        art = import_image(paths.images, name, file, firmware=fw, progress=lambda s, f: update(f, s), kind=kind)
    if art.kind == "iso":
        boots = ", ".join(art.firmware) or "nothing (not bootable)"
        say(f"image {art.name}: ISO imported from {file} ({format_size(art.disk_size_bytes)}; boots {boots}); "
            f"install from it with: kasou vm create NAME --cdrom {art.name} --disk SIZE --boot cdrom,disk")  # fmt: skip
        return
    say(f"image {art.name}: imported from {file} (disk {format_size(art.disk_size_bytes)} {art.disk_format}; "
        f"firmware {', '.join(art.firmware)})")  # fmt: skip


@image_app.command("delete")
def image_delete(name: str) -> None:
    """Remove an image (VMs made from it keep their own copies of its disk)."""
    from kasou.image import delete_image

    delete_image(Paths.from_env().images, name)
    say(f"image {name}: deleted")
