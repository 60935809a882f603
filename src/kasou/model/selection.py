"""Tags on VMs, the filters of a VM list, and which VMs a bulk action selects. No I/O.

A tag is a kasou name (``emr``, ``ward-a``): letters, digits, ``-``, ``_`` and ``.``. A VM carries at
most :data:`TAGS_MAX` of them, kept sorted and each once. A filter names a state, a host, a department
and tags (a VM matches when it has every tag asked for); a bulk action's selector is a filter that must
narrow something (or say ``all``), so "start everything" never happens by accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.model.parsing import parse_model
from kasou.model.state import VMState

TAGS_MAX = 32
PER_HOST_MAX = 32  # concurrent operations per host a bulk action may ask for
NAMES_MAX = 1000


def check_tags(tags: Iterable[object], what: str = "tag") -> list[str]:
    """Tags as a VM keeps them (sorted, each once), or InvalidSpec naming the first bad one."""
    out = set()
    for t in tags:
        validate_name(t, what)
        assert isinstance(t, str)
        out.add(t)
    if len(out) > TAGS_MAX:
        raise InvalidSpec(f"a VM carries at most {TAGS_MAX} tags, not {len(out)}", field="tags")
    return sorted(out)


def changed_tags(have: Iterable[str], replace: list[str] | None, add: list[str] | None,
                 remove: list[str] | None) -> list[str]:  # fmt: skip
    """A VM's tags after ``replace`` (the whole set), then ``add`` and ``remove``."""
    tags = set(have if replace is None else replace) | set(add or [])
    return check_tags(tags - set(remove or []))


class VMFilter(BaseModel):
    """What ``kasou vm list --state S --host H --tag T --department D`` and ``GET /v1/vms?...`` keep."""

    model_config = ConfigDict(extra="forbid")

    state: VMState | None = None
    host: str | None = None
    department: str | None = None
    tags: list[str] = []  # every one of them

    def check(self) -> None:
        if self.host is not None:
            validate_name(self.host, "host")
        if self.department is not None:
            validate_name(self.department, "department")
        for t in self.tags:
            validate_name(t, "tag")

    @property
    def narrows(self) -> bool:
        return bool(self.state or self.host or self.department or self.tags)

    def matches(self, state: VMState, host: str | None, department: str | None, tags: Iterable[str]) -> bool:
        return (
            (self.state is None or state == self.state)
            and (self.host is None or host == self.host)
            and (self.department is None or department == self.department)
            and set(self.tags) <= set(tags)
        )


class BulkAction(StrEnum):
    START = "start"
    SHUTDOWN = "shutdown"
    STOP = "stop"


class BulkSelector(VMFilter):
    """The body of ``POST /v1/vms/actions/{action}``: which VMs, and how many at once per host."""

    names: list[str] = []  # these VMs (with the filters, those of them that match)
    all: StrictBool = False  # every VM the caller may act on (templates never)
    window: str | None = None  # a vendor's: the VMs of this maintenance window of theirs only
    per_host: StrictInt | None = None  # operations at once on one host (default: from its CPUs)
    timeout: StrictInt | None = None  # a shutdown's wait before the hard stop, per VM (seconds)

    @classmethod
    def parse(cls, data: Any) -> BulkSelector:
        sel: BulkSelector = parse_model(cls, data if data is not None else {})
        sel.check()
        for n in sel.names:
            validate_name(n)
        if len(sel.names) > NAMES_MAX:
            raise InvalidSpec(f"give at most {NAMES_MAX} VM names, not {len(sel.names)}", field="names")
        if not sel.all and not sel.narrows and not sel.names and sel.window is None:
            raise InvalidSpec(
                "say which VMs: give names, tags, a host, a department or a state, or all (kasou vm start --all) "
                "to act on every VM",
                field="all",
            )
        if sel.all and (sel.narrows or sel.names):
            raise InvalidSpec("give either all or filters (names, tags, host, department, state), not both",
                              field="all")  # fmt: skip
        if sel.per_host is not None and not 1 <= sel.per_host <= PER_HOST_MAX:
            raise InvalidSpec(f"per_host must be between 1 and {PER_HOST_MAX}, not {sel.per_host}", field="per_host")
        if sel.timeout is not None and not 1 <= sel.timeout <= 3600:
            raise InvalidSpec(f"timeout must be between 1 and 3600 s, not {sel.timeout}", field="timeout")
        return sel

    def picks(self, name: str, state: VMState, host: str | None, department: str | None, tags: Iterable[str]) -> bool:
        if state == VMState.TEMPLATE:
            return False
        if self.names and name not in self.names:
            return False
        return self.matches(state, host, department, tags)
