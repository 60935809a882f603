"""Spec validation: names, sizes and the create request (with hypothesis)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kasou.errors import InvalidSpec
from kasou.model.spec import NAME_MAX, VMCreate, validate_name
from kasou.model.units import format_size, parse_size

SAFE = string.ascii_letters + string.digits + "-_."


@given(st.text(alphabet=SAFE, min_size=1, max_size=NAME_MAX))
def test_names_of_safe_characters(name: str) -> None:
    ok = name[0].isalnum() and ".." not in name
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(InvalidSpec):
            validate_name(name)


@given(st.text(min_size=1, max_size=80))
def test_any_accepted_name_is_path_and_shell_safe(name: str) -> None:
    try:
        validate_name(name)
    except InvalidSpec as e:
        assert "\n" not in e.message
        return
    assert "/" not in name and ".." not in name and " " not in name
    assert not set(name) & set(";&|$`'\"\\<>(){}*?!~#\n\t")
    assert 1 <= len(name) <= NAME_MAX


@pytest.mark.parametrize(
    "bad", ["", "a/b", "../x", "..", "a b", "x;y", "$(id)", "a" * 64, "-x", ".hidden", "é", "x\n", "0\n"]
)
def test_bad_names(bad: str) -> None:
    with pytest.raises(InvalidSpec):
        validate_name(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1M", 1 << 20), ("512M", 512 << 20), ("10G", 10 << 30), ("1GiB", 1 << 30), ("1.5G", 3 << 29), ("1T", 1 << 40),
     ("1048576", 1 << 20), (" 2 g ", 2 << 30)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "1X", "1.2.3G", "0", "100", "65T", True, None, 1.5])
def test_parse_size_refuses(bad: object) -> None:
    with pytest.raises(InvalidSpec):
        parse_size(bad)


@given(st.integers(min_value=1 << 20, max_value=1 << 40))
def test_parse_size_round_trips_bytes(n: int) -> None:
    assert parse_size(str(n)) >= n
    assert parse_size(str(n)) % 512 == 0
    assert parse_size(str(n)) - n < 512


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=True), st.none(), st.booleans()))
def test_parse_size_never_crashes(value: object) -> None:
    try:
        n = parse_size(value)
    except InvalidSpec as e:
        assert e.message
    else:
        assert (1 << 20) <= n <= 64 << 40


def test_format_size() -> None:
    assert format_size(10 << 30) == "10 GiB"
    assert format_size(1536 << 20) == "1.5 GiB"
    assert format_size(300) == "300 B"


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(st.text(max_size=70), st.integers()),
            "vcpus": st.one_of(st.integers(-5, 300), st.text(max_size=3), st.floats()),
            "memory_mib": st.one_of(st.integers(-1, 1 << 23), st.text(max_size=5)),
            "image": st.one_of(st.none(), st.just("tiny"), st.text(max_size=8)),
            "template": st.one_of(st.none(), st.text(max_size=8)),
            "disk": st.one_of(st.none(), st.text(max_size=6), st.integers()),
            "extra": st.integers(),
        },
    )
)
def test_create_parse_is_total(data: dict) -> None:
    """Any input either parses into a valid spec or raises InvalidSpec with one line."""
    try:
        spec = VMCreate.parse(data)
    except InvalidSpec as e:
        assert e.message and "\n" not in e.message
        return
    assert validate_name(spec.name) == spec.name
    assert 1 <= spec.vcpus <= 255
    assert spec.memory_mib >= 32
    assert (spec.image is None) != (spec.template is None)


def test_vm_create_disk_takes_one_size_or_a_list() -> None:
    from kasou.model.spec import VMCreate

    one = VMCreate.parse({"name": "a", "image": "tiny", "disk": "1G"})
    assert (one.disk_bytes, one.data_disks) == (1 << 30, [])
    many = VMCreate.parse({"name": "a", "image": "tiny", "disk": ["1G", "10G", 1 << 20]})
    assert (many.disk_bytes, many.data_disks) == (1 << 30, [10 << 30, 1 << 20])
    for bad, words in [([], "between 1 and 16"), (["1G"] * 17, "between 1 and 16"), (["1G", "x"], "not a size")]:
        with pytest.raises(InvalidSpec, match=words):
            VMCreate.parse({"name": "a", "image": "tiny", "disk": bad})


def test_vm_update_takes_sizes_within_the_create_limits() -> None:
    from kasou.model.spec import VMUpdate

    assert VMUpdate.parse({"vcpus": 2, "memory_mib": 512}).sizes == {"vcpus": 2, "memory_mib": 512}
    assert VMUpdate.parse({"description": "x"}).sizes == {}
    for bad, words in [({"vcpus": 0}, "vcpus must be"), ({"memory_mib": 8}, "memory_mib must be"),
                       ({"vcpus": True}, "vcpus"), ({}, "nothing to change")]:  # fmt: skip
        with pytest.raises(InvalidSpec, match=words):
            VMUpdate.parse(bad)


def test_device_ids_and_ports() -> None:
    from kasou.model.devices import check_disk_id, check_nic_id, free_port, next_id

    assert next_id("disk", ["disk0", "disk3"]) == "disk4" and next_id("net", []) == "net0"
    assert free_port({None, 1, 3}, 4) == 2 and free_port({1, 2}, 2) is None
    for bad in ("vda", "disk", "disk123", "../disk0"):
        with pytest.raises(InvalidSpec):
            check_disk_id(bad)
    assert check_nic_id("net1") == "net1"
    with pytest.raises(InvalidSpec):
        check_nic_id("eth0")
