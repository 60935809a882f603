"""kasou names (VMs, images, templates, networks, hosts): one rule, no dependencies.

Kept apart from :mod:`kasou.model.spec` so the CLI can check a name without importing pydantic.
"""

from __future__ import annotations

import re

from kasou.errors import InvalidSpec

NAME_MAX = 63
# A name becomes part of file names, QEMU's -name, (hashed) interface names and
# DNS labels: so letters, digits, '-', '_' and '.', starting with a letter or digit.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe kasou name, else raise InvalidSpec."""
    if not isinstance(name, str):
        raise InvalidSpec(f"{what} must be a string", field=what)
    if not name:
        raise InvalidSpec(f"{what} must not be empty", field=what)
    if len(name) > NAME_MAX:
        raise InvalidSpec(f"{what} is {len(name)} characters long; at most {NAME_MAX} are allowed", field=what)
    if ".." in name:
        raise InvalidSpec(f"{what} {name!r} must not contain '..'", field=what)
    if not _NAME_RE.fullmatch(name):
        raise InvalidSpec(
            f"{what} {name!r} may contain only letters, digits, '-', '_' and '.', "
            "and must start with a letter or digit",
            field=what,
        )
    return name
