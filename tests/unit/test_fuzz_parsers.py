"""A bounded fuzz run (hypothesis) of the parsers of what users send: only success or kasou's InvalidSpec.

VMCreate, VMUpdate, NetworkCreate, UserCreate, the other body parsers of kasou.model, names, sizes, and
the planner's inventory CSV and price sheet. Any other exception (a TypeError, an OverflowError, the csv
module's own error) is a bug: the API would answer it with a 500, the CLI with a traceback.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.errors import InvalidSpec
from kasou.model.desktops import DesktopPoolCreate, DesktopPoolResize, DesktopRequest, validate_pool_name
from kasou.model.names import validate_name
from kasou.model.pools import PoolCreate, validate_pool_path
from kasou.model.snapshots import SnapshotCreate, validate_snapshot_name
from kasou.model.spec import NetworkCreate, VMCreate, VMUpdate, validate_network_name, validate_vlan
from kasou.model.units import parse_size
from kasou.model.users import UserCreate, check_password
from kasou.planner.inventory import COLUMNS, parse_inventory, sample_text
from kasou.planner.prices import parse_prices

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["tiny", "vm1", "1G", "512M", "user", "admin", "operator", "local", "shared", "a" * 70, "..",
                       "1e999", "NaN", "-1", "0", "\x00", "vm\u0456", "1" * 400 + ".5G", "9" * 400])
)  # fmt: skip
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=8)  # fmt: skip


def bodies(model: Any) -> st.SearchStrategy[Any]:
    """Dicts over the model's own fields (so the checks after pydantic are reached), sometimes anything."""
    fields = {name: json_values for name in model.model_fields}
    return st.fixed_dictionaries({}, optional=fields) | json_values


def only_invalid_spec(parse: Callable[[Any], Any], value: Any) -> None:
    try:
        parse(value)
    except InvalidSpec as e:
        assert e.message and "\n" not in e.message, e.message


PARSERS: list[tuple[str, Callable[[Any], Any], Any]] = [
    ("VMCreate", VMCreate.parse, VMCreate),
    ("VMUpdate", VMUpdate.parse, VMUpdate),
    ("NetworkCreate", NetworkCreate.parse, NetworkCreate),
    ("UserCreate", UserCreate.parse, UserCreate),
    ("PoolCreate", PoolCreate.parse, PoolCreate),
    ("SnapshotCreate", SnapshotCreate.parse, SnapshotCreate),
    ("DesktopPoolCreate", DesktopPoolCreate.parse, DesktopPoolCreate),
    ("DesktopPoolResize", DesktopPoolResize.parse, DesktopPoolResize),
    ("DesktopRequest", DesktopRequest.parse, DesktopRequest),
]


@pytest.mark.parametrize(("name", "parse", "model"), PARSERS, ids=[p[0] for p in PARSERS])
def test_body_parsers(name: str, parse: Callable[[Any], Any], model: Any) -> None:
    @FUZZ
    @given(bodies(model))
    def run(body: Any) -> None:
        only_invalid_spec(parse, body)

    run()


VALIDATORS: list[Callable[[Any], Any]] = [
    validate_name,
    validate_network_name,
    validate_pool_name,
    validate_snapshot_name,
    validate_pool_path,
    validate_vlan,
    check_password,
    parse_size,
]
size_text = st.from_regex(r"\A\s*\d{1,30}(\.\d{0,30})?\s*[A-Za-z]{0,3}\s*\Z")


@pytest.mark.parametrize("check", VALIDATORS, ids=[v.__name__ for v in VALIDATORS])
def test_names_and_sizes(check: Callable[[Any], Any]) -> None:
    @FUZZ
    @given(json_values | size_text | st.text(alphabet=string.printable, max_size=80))
    def run(value: Any) -> None:
        only_invalid_spec(check, value)

    run()


HEADER = [c.name for c in COLUMNS]
_sample = sample_text().splitlines()
field = st.text(max_size=12) | st.sampled_from(["1", "0", "-1", "2.5", "1e999", "nan", "100", "24h", "batch", "",
                                               "1,000", "a\x00b", '"', "x" * 200])  # fmt: skip


@st.composite
def inventories(draw: st.DrawFn) -> str:
    header = draw(st.permutations(HEADER) | st.lists(st.sampled_from(HEADER), min_size=1, max_size=20))
    rows = draw(st.lists(st.lists(field, min_size=len(header) - 1, max_size=len(header) + 1), max_size=4))
    lines = [",".join(header)] + [",".join(r) for r in rows]
    if draw(st.booleans()):
        lines += draw(st.lists(st.sampled_from(_sample[1:]), max_size=3))
    return "\n".join(lines)


def test_inventory_csv() -> None:
    @FUZZ
    @given(inventories() | st.text(max_size=300))
    def run(text: str) -> None:
        only_invalid_spec(parse_inventory, text)

    run()


def test_inventory_csv_known_hazards() -> None:
    head = ",".join(HEADER)
    for text in (head + "\nA\x00", head + '\n"' + "x" * 200_000 + '"', "\x00", '"unterminated\n', "\ufeff" + head):
        only_invalid_spec(parse_inventory, text)


def test_price_sheet() -> None:
    @FUZZ
    @given(st.text(max_size=300) | json_values.map(str))
    def run(text: str) -> None:
        only_invalid_spec(parse_prices, text)

    run()


def test_size_known_hazards() -> None:
    """Found by this run: sizes that overflowed a float or Python's int conversion (OverflowError, ValueError)."""
    for value in ("1" * 400 + ".5G", "9" * 400, "1" * 5000, 10**400, -(10**400), 10**30):
        with pytest.raises(InvalidSpec):
            parse_size(value)
    assert parse_size("1.5G") == 1536 * 1024 * 1024
