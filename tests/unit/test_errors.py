from __future__ import annotations

import httpx
import pytest

from kasou import errors as E
from kasou.wire import raise_for_response, status_for


@pytest.mark.parametrize(
    ("err", "status"),
    [(E.InvalidSpec("x"), 422), (E.ImageNotFound("x"), 404), (E.WrongState("x"), 409), (E.AlreadyExists("x"), 409),
     (E.InsufficientResources("x"), 409), (E.Unauthorized("x"), 401), (E.AgentUnavailable("x"), 503),
     (E.OperationTimeout("x"), 504), (E.QemuStartError("x"), 502), (E.KasouError("x"), 500)],
)  # fmt: skip
def test_status_mapping(err: E.KasouError, status: int) -> None:
    assert status_for(err) == status


def test_round_trip_over_http() -> None:
    err = E.WrongState("cannot start VM 'a' while it is running", vm="a")
    resp = httpx.Response(409, json=err.to_dict())
    with pytest.raises(E.WrongState) as e:
        raise_for_response(resp)
    assert e.value.message == err.message
    assert e.value.details == {"vm": "a"}


def test_messages_are_one_line() -> None:
    assert E.KasouError("a\nb   c").message == "a b c"


def test_docstrings_name_modules_that_exist() -> None:
    """A ``:mod:`` reference in kasou's docstrings (errors.py's names the HTTP mapping's home) resolves."""
    import importlib.util
    import re
    from pathlib import Path

    import kasou

    root = Path(kasou.__file__).parent
    missing = []
    for path in sorted(root.rglob("*.py")):
        for mod in re.findall(r":mod:`~?(kasou[\w.]*)`", path.read_text()):
            if importlib.util.find_spec(mod) is None:
                missing.append(f"{path.relative_to(root)}: {mod}")
    assert not missing, missing
