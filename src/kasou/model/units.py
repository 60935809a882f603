"""Sizes: parsing ``512M``/``10G`` and printing bytes for people. Pure, no dependencies."""

from __future__ import annotations

import re

from kasou.errors import InvalidSpec

MIB = 1024 * 1024
MIN_DISK_BYTES = MIB
MAX_DISK_BYTES = 64 * 1024**4  # 64 TiB

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_TEXT_MAX = 40  # a size written longer is no size (and would overflow a float, or Python's int conversion)
_SHOWN_MAX = 1024**6  # format_size divides as floats: larger numbers are not shown
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object, what: str = "size") -> int:
    """Parse a size such as ``512M``, ``10G``, ``1.5GiB`` or ``1048576`` into bytes.

    Units are binary (K = 1024). A bare number is bytes, as in ``qemu-img``.
    """
    if isinstance(value, bool):
        raise InvalidSpec(f"{what} must be a size such as 512M or 10G", field=what)
    if isinstance(value, int):
        n = value
    else:
        if not isinstance(value, str):
            raise InvalidSpec(f"{what} must be a size such as 512M or 10G", field=what)
        m = _SIZE_RE.match(value) if len(value) <= _TEXT_MAX else None
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            shown = repr(value) if len(value) <= _TEXT_MAX else f"{value[:_TEXT_MAX]!r}..."
            raise InvalidSpec(f"{what} {shown} is not a size; use e.g. 512M, 10G or 1T", field=what)
        number = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
        n = int(number * _UNITS[unit])  # at most 40 digits: always a finite float
    if n < MIN_DISK_BYTES:
        shown = format_size(n) if n > -_SHOWN_MAX else "(negative)"
        raise InvalidSpec(f"{what} {shown} is below the minimum of 1 MiB", field=what)
    if n > MAX_DISK_BYTES:
        shown = format_size(n) if n < _SHOWN_MAX else "(over 1 EiB)"
        raise InvalidSpec(f"{what} {shown} is above the maximum of 64 TiB", field=what)
    # qcow2 images are sized in whole 512-byte sectors; round up, never down.
    return (n + 511) // 512 * 512


def format_size(n: int) -> str:
    """Bytes as a short human size (``10 GiB``, ``512 MiB``, ``300 B``)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= factor:
            v = n / factor
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"
