"""The pure parts of the tiny image: module ordering, modinfo, manifest, caching.

No QEMU, apt or root here: :func:`kasou.image.tiny.build` is replaced by a fake
where a whole build is needed.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest

import kasou.image as image
from kasou.errors import ImageError, ImageNotFound
from kasou.image import KNOWN_IMAGES, ImageArtifacts, build_image, load_image, tiny

# The real graph of Debian 12's cloud kernel (modinfo -F depends).
VIRTIO_DEPENDS: dict[str, list[str]] = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci_modern_dev": [],
    "virtio_pci_legacy_dev": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"],
    "virtio_blk": ["virtio", "virtio_ring"],
    "virtio_console": ["virtio", "virtio_ring"],
    "failover": [],
    "net_failover": ["failover"],
    "virtio_net": ["virtio_ring", "virtio", "net_failover"],
    "button": [],
    "evdev": [],
}


def _assert_topological(order: list[str], depends: dict[str, list[str]]) -> None:
    for i, name in enumerate(order):
        for dep in depends[name]:
            assert dep in order[:i], f"{name} is loaded before its dependency {dep}"


# --------------------------------------------------------------------------
# Module dependency ordering
# --------------------------------------------------------------------------


def test_order_of_the_real_virtio_graph_follows_dependencies() -> None:
    order = tiny.dependency_order(reversed(list(VIRTIO_DEPENDS)), VIRTIO_DEPENDS)
    assert sorted(order) == sorted(VIRTIO_DEPENDS)
    _assert_topological(order, VIRTIO_DEPENDS)


def test_order_keeps_the_asked_order_where_dependencies_allow() -> None:
    assert tiny.dependency_order(tiny.VIRTIO_MODULES, VIRTIO_DEPENDS) == list(tiny.VIRTIO_MODULES)


def test_dependencies_are_added_and_builtins_skipped() -> None:
    depends = {"ext4": ["jbd2", "mbcache", "crc16"], "jbd2": [], "mbcache": [], "crc16": []}
    assert tiny.dependency_order(["ext4"], depends) == ["jbd2", "mbcache", "crc16", "ext4"]
    # Built in: nothing to insmod, and its dependencies need not be known.
    assert tiny.dependency_order(["ext4", "virtio_blk"], VIRTIO_DEPENDS, builtin={"ext4"}) == [
        "virtio_ring",
        "virtio",
        "virtio_blk",
    ]
    assert tiny.dependency_order(["virtio_net"], VIRTIO_DEPENDS, builtin={"net_failover", "virtio"}) == [
        "virtio_ring",
        "virtio_net",
    ]


def test_names_are_normalised() -> None:
    assert tiny.dependency_order(["virtio-blk"], VIRTIO_DEPENDS) == ["virtio_ring", "virtio", "virtio_blk"]


def test_missing_module_names_who_needs_it() -> None:
    with pytest.raises(ImageError, match=r"'net_failover' not found .*needed by virtio_net"):
        tiny.dependency_order(["virtio_net"], {k: v for k, v in VIRTIO_DEPENDS.items() if k != "net_failover"})


def test_dependency_cycle_is_an_error() -> None:
    with pytest.raises(ImageError, match="cycle: a -> b -> a"):
        tiny.dependency_order(["a"], {"a": ["b"], "b": ["a"]})


# --------------------------------------------------------------------------
# modinfo, modules.builtin, apt-cache
# --------------------------------------------------------------------------


def _fake_module(modinfo: list[str]) -> bytes:
    """A minimal little-endian ELF64 file with a .modinfo section."""
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info = b"".join(entry.encode() + b"\0" for entry in modinfo)
    info_off = 64
    shstr_off = info_off + len(info)
    shoff = shstr_off + len(shstrtab)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    null = bytes(64)
    sec_info = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, info_off, len(info), 0, 0, 1, 0)
    sec_str = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0)
    return header + info + shstrtab + null + sec_info + sec_str


def test_read_modinfo_and_depends() -> None:
    blob = _fake_module(["license=GPL", "depends=virtio_ring,virtio,net-failover", "name=virtio_net"])
    info = tiny.read_modinfo(blob)
    assert info["name"] == ["virtio_net"]
    assert tiny.module_depends(info) == ["virtio_ring", "virtio", "net_failover"]
    assert tiny.module_depends(tiny.read_modinfo(_fake_module(["depends=", "name=failover"]))) == []


def test_read_modinfo_rejects_what_is_not_a_module() -> None:
    with pytest.raises(ImageError, match="not an ELF"):
        tiny.read_modinfo(b"hello" * 20)
    with pytest.raises(ImageError):
        tiny.read_modinfo(_fake_module(["depends="])[:100])


def test_module_names_and_builtin_list() -> None:
    assert tiny.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert tiny.module_name("ext4.ko.zst") == "ext4"
    assert tiny.module_name("evdev.ko") == "evdev"
    text = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n\nkernel/lib/crc16.ko\n"
    assert tiny.parse_modules_builtin(text) == {"ext4", "jbd2", "crc16"}


def test_parse_apt_depends() -> None:
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n"
    assert tiny.parse_apt_depends(out) == "linux-image-6.1.0-57-cloud-amd64"
    with pytest.raises(ImageError):
        tiny.parse_apt_depends("linux-image-cloud-amd64\n")


def test_rc_script_loads_modules_in_the_given_order() -> None:
    rc = tiny.render_rc(["virtio_ring", "virtio", "virtio_blk"], "6.1.0-test")
    assert "modprobe -a virtio_ring virtio virtio_blk" in rc
    assert "for m in virtio_ring virtio virtio_blk; do" in rc
    assert "/lib/modules/6.1.0-test/kasou/$m.ko" in rc
    assert "@" not in rc.replace("$@", "")
    for contract in ("recovered $N", "KASOU-READY", 'seq $n"', "hb $up", tiny.HEARTBEAT_PORT):
        assert contract in rc


# --------------------------------------------------------------------------
# Manifest, cache, atomic build
# --------------------------------------------------------------------------


def _fake_build(calls: list[Path]) -> object:
    def build(dest: Path, cache_dir: Path, progress: tiny.Progress) -> tiny.TinyBuild:
        calls.append(dest)
        progress("pretending", 0.5)
        (dest / "vmlinuz").write_bytes(b"kernel")
        (dest / "initramfs.gz").write_bytes(b"initrd")
        (dest / "disk.raw").write_bytes(b"\0" * 1024)
        return tiny.TinyBuild(
            kernel="vmlinuz",
            initrd="initramfs.gz",
            disk="disk.raw",
            disk_format="raw",
            disk_size_bytes=1024,
            kernel_args=tiny.KERNEL_ARGS,
            kernel_version="6.1.0-test",
            packages=["x.deb"],
            modules=["virtio"],
        )

    return build


def _leftovers(images_dir: Path) -> list[str]:
    return sorted(p.name for p in images_dir.iterdir() if ".build-" in p.name or ".old-" in p.name)


def test_build_then_load_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build", _fake_build(calls))
    steps: list[tuple[str, float]] = []
    art = build_image(tmp_path, progress=lambda s, f: steps.append((s, f)))
    assert len(calls) == 1
    assert steps[-1] == ("done", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in steps)
    root = tmp_path.absolute() / "tiny"
    assert art == ImageArtifacts(
        name="tiny",
        root=root,
        kernel=root / "vmlinuz",
        initrd=root / "initramfs.gz",
        disk=root / "disk.raw",
        disk_format="raw",
        disk_size_bytes=1024,
        kernel_args=tiny.KERNEL_ARGS,
    )
    assert load_image(tmp_path, "tiny") == art
    assert art.to_dict()["kernel"] == str(root / "vmlinuz")
    json.dumps(art.to_dict())
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kernel_version"] == "6.1.0-test"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert _leftovers(tmp_path) == []


def test_a_complete_build_is_cached_unless_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build", _fake_build(calls))
    first = build_image(tmp_path)
    assert build_image(tmp_path) == first
    assert len(calls) == 1
    assert build_image(tmp_path, force=True) == first
    assert len(calls) == 2
    assert _leftovers(tmp_path) == []


def test_a_build_without_manifest_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build", _fake_build(calls))
    build_image(tmp_path)
    (tmp_path / "tiny" / "manifest.json").unlink()
    build_image(tmp_path)
    assert len(calls) == 2


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dest: Path, cache_dir: Path, progress: tiny.Progress) -> tiny.TinyBuild:
        (dest / "vmlinuz").write_bytes(b"half")
        raise ImageError("'mke2fs -q' failed: no space left")

    monkeypatch.setattr(tiny, "build", broken)
    with pytest.raises(ImageError, match="mke2fs"):
        build_image(tmp_path)
    assert not (tmp_path / "tiny").exists()
    assert _leftovers(tmp_path) == []


def test_os_errors_become_image_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dest: Path, cache_dir: Path, progress: tiny.Progress) -> tiny.TinyBuild:
        raise PermissionError(13, "Permission denied", str(dest))

    monkeypatch.setattr(tiny, "build", broken)
    with pytest.raises(ImageError, match="building image 'tiny' failed") as err:
        build_image(tmp_path)
    assert "\n" not in err.value.message
    assert _leftovers(tmp_path) == []


def test_failed_forced_rebuild_keeps_the_old_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "build", _fake_build([]))
    art = build_image(tmp_path)

    def broken(dest: Path, cache_dir: Path, progress: tiny.Progress) -> tiny.TinyBuild:
        raise ImageError("no network")

    monkeypatch.setattr(tiny, "build", broken)
    with pytest.raises(ImageError):
        build_image(tmp_path, force=True)
    assert load_image(tmp_path, "tiny") == art


def test_stale_temp_dirs_of_dead_builds_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".tiny.build-dead").mkdir()
    (tmp_path / ".tiny.build-dead" / "vmlinuz").write_bytes(b"x")
    monkeypatch.setattr(tiny, "build", _fake_build([]))
    build_image(tmp_path)
    assert _leftovers(tmp_path) == []


def test_unknown_image_name(tmp_path: Path) -> None:
    assert KNOWN_IMAGES == ("tiny", "debian")
    with pytest.raises(ImageNotFound, match="unknown image 'huge'"):
        build_image(tmp_path, "huge")
    with pytest.raises(ImageNotFound, match="unknown image 'huge'"):
        load_image(tmp_path, "huge")
    assert list(tmp_path.iterdir()) == []


def test_load_image_that_is_not_built(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound) as err:
        load_image(tmp_path, "tiny")
    assert err.value.message == "image 'tiny' is not built; run: kasou image build tiny"


def test_load_image_with_damaged_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "build", _fake_build([]))
    build_image(tmp_path)
    manifest = tmp_path / "tiny" / image.MANIFEST_NAME
    manifest.write_text("{not json")
    with pytest.raises(ImageError, match="damaged manifest"):
        load_image(tmp_path, "tiny")
    manifest.write_text(json.dumps({"manifest_version": 1, "name": "tiny"}))
    with pytest.raises(ImageError, match="damaged manifest"):
        load_image(tmp_path, "tiny")


def test_load_image_with_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "build", _fake_build([]))
    build_image(tmp_path)
    os.unlink(tmp_path / "tiny" / "disk.raw")
    with pytest.raises(ImageError, match=r"missing disk\.raw; rebuild it with: kasou image build tiny --force"):
        load_image(tmp_path, "tiny")


def test_kernel_package_falls_back_to_the_download_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_apt(cmd: list[str], **kwargs: object) -> str:
        raise ImageError("'apt-cache depends' failed: no lists")

    monkeypatch.setattr(tiny, "run", no_apt)
    with pytest.raises(ImageError, match="cannot find the kernel package"):
        tiny.kernel_package_name(tmp_path)
    (tmp_path / "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb").write_bytes(b"")
    assert tiny.kernel_package_name(tmp_path) == "linux-image-6.1.0-57-cloud-amd64"


def test_collect_modules_from_a_kernel_tree(tmp_path: Path) -> None:
    """Compressed modules are unpacked; ext4 is skipped when built in, asked for when not."""
    import lzma

    moddir = tmp_path / "lib/modules/6.1.0-test"
    for name, deps in VIRTIO_DEPENDS.items():
        blob = _fake_module([f"depends={','.join(deps)}", f"name={name}"])
        path = moddir / "kernel/drivers" / f"{name}.ko.xz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lzma.compress(blob))
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n")
    modules = tiny.collect_modules(moddir)
    names = [m.name for m in modules]
    assert sorted(names) == sorted(VIRTIO_DEPENDS)
    _assert_topological(names, VIRTIO_DEPENDS)
    assert all(m.data.startswith(b"\x7fELF") for m in modules)
    assert {m.name: list(m.depends) for m in modules} == VIRTIO_DEPENDS

    # ext4 as a module: it and its dependencies are loaded; crc32c_generic is optional.
    (moddir / "modules.builtin").write_text("")
    for name, deps in {"ext4": ["jbd2", "mbcache", "crc16"], "jbd2": [], "mbcache": [], "crc16": []}.items():
        (moddir / "kernel/fs" / f"{name}.ko").parent.mkdir(parents=True, exist_ok=True)
        (moddir / "kernel/fs" / f"{name}.ko").write_bytes(_fake_module([f"depends={','.join(deps)}", f"name={name}"]))
    names = [m.name for m in tiny.collect_modules(moddir)]
    assert names.index("ext4") > max(names.index("jbd2"), names.index("mbcache"), names.index("crc16"))
    assert "crc32c_generic" not in names


def test_modules_dep_lists_all_dependencies_the_first_to_load_last() -> None:
    order = tiny.dependency_order(tiny.VIRTIO_MODULES, VIRTIO_DEPENDS)
    modules = [tiny.KernelModule(name, b"", tuple(VIRTIO_DEPENDS[name])) for name in order]
    lines = tiny.render_modules_dep(modules).splitlines()
    assert lines[0] == "kasou/virtio_ring.ko:"
    assert "kasou/virtio_net.ko: kasou/net_failover.ko kasou/failover.ko kasou/virtio.ko kasou/virtio_ring.ko" in lines
    assert (
        "kasou/virtio_pci.ko: kasou/virtio_pci_legacy_dev.ko kasou/virtio_pci_modern_dev.ko "
        "kasou/virtio.ko kasou/virtio_ring.ko"
    ) in lines
