"""The bounds on sign-in attempts and on anonymous audit records (kasou.api.limits, kasou.api.audit)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kasou import errors as E
from kasou.api import audit as api_audit
from kasou.api.limits import SignInLimiter, source_key
from kasou.control import audit
from kasou.store.sqlite import SqliteStore
from kasou.wire import error_headers, status_for


def test_rate_limited_is_429_with_retry_after() -> None:
    err = E.RateLimited("too many failed sign-ins from 10.0.0.1: try again in 6 s", retry_after_s=6)
    assert status_for(err) == 429 and error_headers(err) == {"Retry-After": "6"}
    assert error_headers(E.Unauthorized("x")) is None


@pytest.mark.parametrize(
    ("address", "key"),
    [("10.0.0.1", "10.0.0.1"), ("2001:db8::1", "2001:db8::/64"), ("2001:db8::ffff:1:2", "2001:db8::/64"),
     ("::ffff:10.0.0.7", "10.0.0.7"), ("testclient", "testclient")],
)  # fmt: skip
def test_source_keys(address: str, key: str) -> None:
    assert source_key(address) == key


def test_the_limiter_refills_and_forgets_full_buckets() -> None:
    lim = SignInLimiter(rate=6)  # 6 at once, then one every 10 s
    for _ in range(6):
        lim.take("10.0.0.1", now=0.0)
    with pytest.raises(E.RateLimited) as e:
        lim.take("10.0.0.1", now=1.0)
    assert e.value.details == {"retry_after_s": 9}
    lim.take("10.0.0.1", now=10.0)  # refilled one
    lim.give_back("10.0.0.1", now=10.0)  # it succeeded
    lim.take("10.0.0.1", now=10.0)
    with pytest.raises(E.RateLimited):
        lim.take("10.0.0.1", now=10.0)
    lim.take("10.0.0.2", now=10.0)
    lim.give_back("10.0.0.2", now=10.0)
    assert "10.0.0.2" not in lim._buckets  # a full allowance is not remembered
    assert SignInLimiter(rate=0).take("10.0.0.1") is None  # 0: no bound


async def test_anonymous_failures_are_summed_up_when_the_window_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_audit, "ANON_WINDOW_S", 0.3)
    monkeypatch.setattr(api_audit, "ANON_SOURCES", 2)
    store = SqliteStore(tmp_path / "state.db")
    svc = cast(Any, SimpleNamespace(store=store))
    anon = api_audit.AnonymousFailures()
    now = time.monotonic()
    burst = api_audit.ANON_BURST
    admitted = [anon.admit("10.0.0.1", "login_failed", f"users/u{i}", now, svc) for i in range(burst + 3)]
    assert admitted == [True] * api_audit.ANON_BURST + [False] * 3
    for src in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):  # two addresses one by one, the others in one record
        for _ in range(api_audit.ANON_BURST + 1):
            anon.admit(src, "POST /v1/vms", "vms", now, svc)
    # No further request comes: the timer writes the aggregates when the window ends.
    deadline = time.monotonic() + 5
    recs: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(recs) < 3:
        await asyncio.sleep(0.05)
        recs = await audit.for_store(store).records(None, None, None, "anonymous_failures", 10)
    by_source = {r["source"]: r for r in recs}
    assert set(by_source) == {"10.0.0.1", "10.0.0.2", ""}, recs
    one = by_source["10.0.0.1"]
    assert one["details"]["count"] == 3 and one["result"]["ok"] is False
    assert one["details"]["targets"] == {f"users/u{i}": 1 for i in range(burst, burst + 3)}
    assert one["result"]["message"].startswith("3 more anonymous failures from 10.0.0.1 in the last ")
    rest = by_source[""]
    assert rest["details"]["addresses"] == ["10.0.0.3", "10.0.0.4"] and rest["details"]["count"] == 2
    assert "from 2 other addresses" in rest["result"]["message"]
    # A new window starts afresh.
    assert anon.admit("10.0.0.1", "login_failed", "users/u0", time.monotonic(), svc) is True
    await store.close()
