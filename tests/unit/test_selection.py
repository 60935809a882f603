"""Tags, filters and bulk selectors (kasou.model.selection) and the bulk start order (kasou.control.bulk)."""

from __future__ import annotations

from typing import Any

import pytest

from kasou.control.base import VMView
from kasou.control.bulk import groups, per_host_default
from kasou.errors import InvalidSpec
from kasou.model.selection import BulkAction, BulkSelector, changed_tags, check_tags
from kasou.model.spec import Startup
from kasou.model.state import VMState


def test_tags_are_kasou_names_sorted_once() -> None:
    assert check_tags(["b", "a", "b"]) == ["a", "b"]
    for bad in ("", "a b", "../x", "-x", "x" * 64, 3):
        with pytest.raises(InvalidSpec):
            check_tags([bad])
    assert changed_tags(["a", "b"], None, ["c"], ["a"]) == ["b", "c"]
    assert changed_tags(["a"], ["x", "y"], None, ["y"]) == ["x"]


def test_a_selector_must_say_which_vms() -> None:
    with pytest.raises(InvalidSpec, match="say which VMs"):
        BulkSelector.parse({})
    with pytest.raises(InvalidSpec, match="either all or filters"):
        BulkSelector.parse({"all": True, "host": "h1"})
    with pytest.raises(InvalidSpec, match="per_host"):
        BulkSelector.parse({"all": True, "per_host": 0})
    with pytest.raises(InvalidSpec):
        BulkSelector.parse({"all": True, "bogus": 1})
    s = BulkSelector.parse({"tags": ["emr", "ward-a"], "state": "stopped"})
    assert s.picks("a", VMState.STOPPED, "h1", None, ["emr", "ward-a", "x"])
    assert not s.picks("a", VMState.STOPPED, "h1", None, ["emr"])
    assert not s.picks("a", VMState.RUNNING, "h1", None, ["emr", "ward-a"])
    assert not BulkSelector.parse({"all": True}).picks("t", VMState.TEMPLATE, "h1", None, [])


def view(name: str, order: int | None = None, priority: int = 50, delay: int = 0) -> VMView:
    fields: dict[str, Any] = {
        "name": name, "uuid": name, "state": "stopped", "host": "h1", "vcpus": 1, "memory_mib": 128, "image": "tiny",
        "template": None, "description": "", "anti_affinity": None, "ha": False, "priority": priority,
        "storage": "local", "replica": None, "ha_armed": False, "disks": [], "nics": [], "guest_ready": False,
        "uptime_s": None, "heartbeat_age_s": None, "accelerator": None, "started_at": None, "created_at": 0.0,
        "state_since": 0.0, "job": None, "last_error": None, "host_reachable": True,
        "startup": Startup(order=order, delay_s=delay) if order is not None else None,
    }  # fmt: skip
    return VMView(**fields)


def test_start_order_groups() -> None:
    vms = [view("app", 2), view("db", 1), view("misc"), view("db2", 1, priority=90), view("app0", 2)]
    assert [[v.name for v in g] for g in groups(vms, BulkAction.START)] == [["db2", "db"], ["app", "app0"], ["misc"]]
    assert [v.name for v in groups(vms, BulkAction.SHUTDOWN)[0]] == ["misc"]
    assert per_host_default(BulkAction.START, 1) == 2 and per_host_default(BulkAction.START, 64) == 8
    assert per_host_default(BulkAction.STOP, 2) == 4
