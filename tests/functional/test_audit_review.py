"""The access-log review (``kasou audit review``, ``GET /v1/audit/review``): a period with each kind of event, its
counts, the HTML report parsed in both languages (every value escaped), the department filter, who may run it."""

from __future__ import annotations

import datetime as dt
import functools
import json
from html.parser import HTMLParser
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kasou.control import audit
from tests.functional.conftest import Env
from tests.functional.test_maintenance_windows import CSRF, PW, Clock, opened, signed_in

EVIL = '<script>alert("x")</script>'


@pytest.fixture
def clock(env: Env) -> Clock:
    c = Clock()
    env.services.windows.clock = c
    return c


def record(env: Env, action: str, **kw: Any) -> None:
    env.api.portal.call(functools.partial(audit.record, env.services.store, action, **kw))


def off_hours() -> str:
    """Working hours that do not hold now in Tokyo: every record of the test is at an unusual hour."""
    h = dt.datetime.now(ZoneInfo("Asia/Tokyo")).hour
    return "13:00-20:00" if h < 12 else "01:00-08:00"


def a_month(env: Env, clock: Clock) -> dict[str, Any]:
    """A period with each kind of event: sign-ins, a failed one, a lock-out, a break-glass use (acknowledged) and
    another (not), a vendor's window with an action in it, a console session with a recording id, permission
    changes."""
    env.create("lab1", department="lab")
    env.create("pacs1", department="pacs")
    v = signed_in(env, "v", "vendor", ["lab"])
    signed_in(env, "vp", "vendor", ["pacs"])
    m = signed_in(env, "m", "manager", ["lab"])
    aud = signed_in(env, "aud", "auditor")
    op = signed_in(env, "op", "operator")
    assert v.post("/v1/auth/login", json={"name": "v", "password": "wrong password!"}).status_code == 401
    w = opened(env, v, clock, ["lab1"])
    assert v.post("/v1/vms/lab1/actions/start", headers=CSRF).status_code == 202
    assert env.api.put("/v1/users/vp/departments", json={"departments": ["pacs", "lab"]}).status_code == 200
    assert env.api.post("/v1/users/aud/tokens", json={}).status_code == 201
    record(env, "lockout", source="10.0.0.9", target="users/v", details={"failures": 5, "locked_s": 900})
    record(env, "break_glass_login", actor={"name": "break-glass", "role": "admin", "via": "break_glass"},
           source="10.0.0.1", target="users/break-glass")  # fmt: skip
    record(env, "break_glass_acknowledge", actor={"name": "root", "role": "admin", "via": "token"}, source="127.0.0.1",
           target="users/break-glass")  # fmt: skip
    record(env, "break_glass_login", actor={"name": "break-glass", "role": "admin", "via": "break_glass"},
           source=EVIL, target="users/break-glass")  # fmt: skip
    live = {"console": "c1", "kind": "vnc", "clipboard": "off", "window": w["id"]}
    record(env, "console_open", actor={"name": "v", "role": "vendor", "via": "session"}, source="192.0.2.7",
           target="vms/lab1", details=live)  # fmt: skip
    record(env, "console_close", actor={"name": "v", "role": "vendor", "via": "session"}, source="192.0.2.7",
           target="vms/lab1", details={**live, "duration_s": 125.4, "bytes_from_client": 2048,
                                       "bytes_to_client": 1048576, "reason": "closed", "recording": "rec-0001"})  # fmt: skip
    record(env, "console_open", actor={"name": "op", "role": "operator", "via": "session"}, source="192.0.2.8",
           target="vms/pacs1", details={"console": "c2", "kind": "vnc", "clipboard": "off"})  # fmt: skip
    return {"v": v, "m": m, "aud": aud, "op": op, "window": w}


def review(c: Any, **params: Any) -> dict[str, Any]:
    r = c.get("/v1/audit/review", params={"hours": off_hours(), "weekends": "false", **params})
    assert r.status_code == 200, r.text
    return dict(r.json())


class Page(HTMLParser):
    """The report's text, its sections, its summary counts, and whether any tag came from a value."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.ids: list[str] = []
        self.counts: list[int] = []
        self.tags: set[str] = set()
        self.external = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if a.get("data-count") is not None:
            self.counts.append(int(str(a["data-count"])))
        if a.get("src") or (tag == "link"):
            self.external = True

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    return p


def test_the_review_counts_each_kind_of_event_and_renders_in_both_languages(env: Env, clock: Clock) -> None:
    a_month(env, clock)
    rev = review(env.api, since="1d")
    assert rev["verify"]["ok"] and rev["department"] is None
    who = {(s["user"], s["role"]) for s in rev["signins"]}
    assert {("v", "vendor"), ("m", "manager"), ("aud", "auditor"), ("op", "operator")} <= who
    assert rev["failed_total"] == 1 and rev["failed_signins"][0]["target"] == "users/v"
    assert [x["target"] for x in rev["lockouts"]] == ["users/v"]
    assert [b["acknowledged"] for b in rev["break_glass"]] == [True, False]
    assert rev["break_glass"][0]["acknowledged_by"] == "root"
    [w] = rev["windows"]
    assert (w["vendor"], w["state"], w["vms"], w["decided_by"]) == ("v", "approved", ["lab1"], "root")
    assert w["actions"] >= 1 and w["summary"].get("POST /v1/vms/lab1/actions/start") == 1
    c1, c2 = rev["consoles"]
    assert (c1["user"], c1["vm"], c1["source"], c1["duration_s"], c1["bytes_to_client"], c1["recording"]) == (
        "v", "lab1", "192.0.2.7", 125.4, 1048576, "rec-0001")  # fmt: skip
    assert c1["window"] and c2["duration_s"] is None and c2["recording"] is None
    kinds = [p["kind"] for p in rev["permission_changes"]]
    assert kinds.count("user_created") == 5 and "departments_set" in kinds and "token_created" in kinds
    u = rev["unusual"]
    assert u["signins"] >= 5 and u["actions"] >= 5 and u["by_user"]["v"] >= 2
    # Working hours that hold all day: nothing is unusual (weekends aside).
    assert review(env.api, since="1d", hours="00:00-23:59", weekends="false")["unusual"]["lines"] == [] or \
        dt.datetime.now(ZoneInfo("Asia/Tokyo")).strftime("%H:%M") == "23:59"  # fmt: skip
    for lang, words in (("ja", ["アクセスログ点検報告書", "改ざんは検出されませんでした", "点検者", "印"]),
                        ("en", ["Access-log review", "No tampering detected", "Reviewed by", "Seal"])):  # fmt: skip
        r = env.api.get("/v1/audit/review", params={"since": "1d", "format": "html", "lang": lang,
                                                    "hours": off_hours(), "weekends": "false"})  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = parse(r.text)
        text = "".join(page.text)
        for word in words:
            assert word in text, (lang, word)
        assert page.ids[:2] == ["verify", "summary"]  # the chain's verification at the top
        assert {"signins", "failed", "lockouts", "break-glass", "windows", "consoles", "perms", "unusual"} <= set(
            page.ids
        )
        # signed in, failed, lock-outs, break-glass, windows, consoles, permission changes, unusual
        assert page.counts[1:7] == [1, 1, 2, 1, 2, len(kinds)], page.counts
        assert "script" not in page.tags and not page.external  # self-contained, and the source value escaped
        assert EVIL in text and EVIL not in r.text and "rec-0001" in text and "192.0.2.7" in text


def test_a_departments_review_and_who_may_run_it(env: Env, clock: Clock) -> None:
    s = a_month(env, clock)
    lab = review(env.api, since="1d", department="lab")
    assert lab["department"] == ["lab"]
    assert [c["vm"] for c in lab["consoles"]] == ["lab1"] and lab["break_glass"] == []
    assert [w["vms"] for w in lab["windows"]] == [["lab1"]]
    assert {x["user"] for x in lab["signins"]} == {"v", "m", "vp"}  # the lab's users now (vp joined it)
    assert "vp" in {p["line"]["target"].removeprefix("users/") for p in lab["permission_changes"]}
    pacs = review(env.api, since="1d", department="pacs")
    assert [c["vm"] for c in pacs["consoles"]] == ["pacs1"] and pacs["windows"] == []
    # The lab's manager reviews the lab (the default) and nothing else.
    assert review(s["m"], since="1d")["department"] == ["lab"]
    r = s["m"].get("/v1/audit/review", params={"department": "pacs"})
    assert r.status_code == 404, r.text
    assert s["m"].get("/v1/audit/review", params={"format": "html", "lang": "en"}).status_code == 200
    # An auditor may; an operator and a vendor may not.
    assert review(s["aud"], since="1d")["records"] > 10
    assert s["op"].get("/v1/audit/review").status_code == 403
    assert s["v"].get("/v1/audit/review").status_code == 403
    # Bad input: one line, 422.
    for params, words in (({"since": "yesterday"}, "since is like"), ({"tz": "Mars/Base"}, "no time zone"),
                          ({"hours": "20:00-07:00"}, "end after"), ({"since": "1d", "until": "2d"}, "ends after")):  # fmt: skip
        r = env.api.get("/v1/audit/review", params=params)
        assert r.status_code == 422 and words in r.json()["message"], (params, r.text)


def test_the_cli_writes_the_report(env: Env, clock: Clock, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from kasou.api.client import Client
    from kasou.cli import common
    from kasou.cli import main as cli
    from tests.functional.conftest import TOKEN

    a_month(env, clock)
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)
    try:
        out = tmp_path / "review.html"
        r = CliRunner().invoke(cli.app, ["audit", "review", "--since", "1d", "--report", str(out), "--lang", "en"])
        assert r.exit_code == 0, r.output
        assert "audit chain: intact" in r.output and "console sessions" in r.output and str(out) in r.output
        assert "Access-log review" in "".join(parse(out.read_text()).text)
        r = CliRunner().invoke(cli.app, ["audit", "review", "--since", "1d", "--department", "lab", "--json"])
        assert r.exit_code == 0 and json.loads(r.output)["department"] == ["lab"], r.output
        r = CliRunner().invoke(cli.app, ["audit", "review", "--lang", "fr"])
        assert r.exit_code == 2  # a usage error
    finally:
        common.client_factory = None
    assert PW
