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
