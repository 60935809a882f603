"""schemathesis against the checked-in OpenAPI document (``src/kasou/api/openapi.json``).

Every operation of the document is called in-process, on the API built as in ``conftest.py`` (the fake
driver, SQLite), with examples schemathesis generates from the document: valid ones (positive) and ones
that break it (negative), first with the API token, then as a signed-in auditor (a low-privilege user:
reads, and a 403 for the rest), last with the token on a VM, a job and a user that exist (generated names
seldom meet them; deletions come last). Each answer must be no 5xx, have a documented status, the
documented content type and a body matching the documented schema, and an invalid request must be refused
with a 4xx. Examples are drawn deterministically (derandomize) and bounded: some 650 requests in 20 s on an
idle machine; the totals are printed.

A failure is a bug in kasou or in its document, fixed there: never by loosening this test.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kasou.api.spec import CHECKED_IN
from tests.functional.conftest import Env

EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 3}  # per operation, with the token
EXAMPLES_AS_USER = 2  # per operation, positive, as the auditor
EXAMPLES_KNOWN = 3  # per operation with a path parameter, positive, on things that exist
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The streams end after ``timeout`` seconds: kept short so a generated 3600 does not hold the run.
FIXED_QUERY = {"/v1/events/stream": {"timeout": 0.05}, "/v1/jobs/{job_id}/events": {"timeout": 0.05},
               "/v1/vms": {"timeout": 0.05}, "/v1/events": {"timeout": 0.05}}  # fmt: skip
PW = "auditor password 1"


def _send(client: TestClient, case: Any, extra_headers: dict[str, str]) -> Any:
    kw = case.as_transport_kwargs(base_url="http://testserver")
    # The credentials are the run's own: none that the generator drew from the document's security schemes.
    mine = {k.lower() for k in extra_headers} | {"user-agent", "authorization", "cookie"}
    headers = {k: v for k, v in (kw.get("headers") or {}).items() if k.lower() not in mine}
    headers.update(extra_headers)
    send: dict[str, Any] = {"headers": headers}
    if kw.get("params"):
        send["params"] = kw["params"]
    if "json" in kw:
        send["content"] = json.dumps(kw["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif kw.get("data") is not None:
        data = kw["data"]
        send["content"] = data if isinstance(data, bytes) else str(data).encode()
    return client.request(kw["method"], kw["url"], **send)


class Run:
    """Counts what was sent and what failed, one line per distinct failure."""

    def __init__(self) -> None:
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.failures: dict[str, str] = {}

    def check(self, label: str, case: Any, response: Any, mode: GenerationMode) -> None:
        self.sent += 1
        self.statuses[response.status_code] += 1

        checks = [*CHECKS, negative_data_rejection] if mode == GenerationMode.NEGATIVE else CHECKS
        try:
            case.validate_response(response, checks=checks)
        except (FailureGroup, AssertionError) as e:
            first = str(e).strip().splitlines()
            key = f"{label} [{mode.value}] {response.status_code}"
            self.failures.setdefault(key, f"{first[:6]} body={response.text[:300]!r}")


def _breakable(op: Any) -> bool:
    """Whether a request to ``op`` can break the document: a body, a query parameter or a constrained path
    parameter. A path parameter that is any string cannot (the negative generator would search in vain)."""
    raw = op.definition.raw
    if "requestBody" in raw:
        return True
    for p in raw.get("parameters", []):
        if p.get("in") == "query" or set(p.get("schema", {})) - {"type", "title"}:
            return True
    return False


def _exercise(run: Run, schema: Any, client: TestClient, headers: dict[str, str], examples: dict[Any, int],
              skip: tuple[str, ...] = (), known: dict[str, str] | None = None) -> None:  # fmt: skip
    """Every operation, ``examples[mode]`` examples each; ``known``: path parameters that name things that exist
    (an operation with no such parameter is left out then)."""
    ops = [result.ok() for result in schema.get_all_operations()]
    for op in sorted(ops, key=lambda op: op.method.upper() == "DELETE"):  # deletions last: they end things
        label = f"{op.method.upper()} {op.path}"
        if label in skip:
            continue
        fixed = None
        if known is not None:
            fixed = {p.name: known[p.name] for p in op.path_parameters if p.name in known}
            if not fixed:
                continue
        for mode, n in examples.items():
            if mode == GenerationMode.NEGATIVE and not _breakable(op):
                continue
            strategy = op.as_strategy(generation_mode=mode, query=FIXED_QUERY.get(op.path), path_parameters=fixed)
            _one(run, strategy, n, label, mode, client, headers)


def _one(run: Run, strategy: Any, n: int, label: str, mode: GenerationMode, client: TestClient,
         headers: dict[str, str]) -> None:  # fmt: skip
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def call(case: Any) -> None:
        run.check(label, case, _send(client, case, headers), mode)

    try:
        call()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, label  # nothing to break in an operation without input


@pytest.mark.timeout(240)
def test_schemathesis_against_the_checked_in_document(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_path(str(CHECKED_IN))
    t0 = time.monotonic()
    env.create("vm1")  # something for the generated names to meet now and then
    run = Run()
    _exercise(run, schema, env.api, {}, EXAMPLES)
    as_token = run.sent

    r = env.api.post("/v1/users", json={"name": "aud", "role": "auditor", "password": PW})
    assert r.status_code == 201, r.text
    browser = env.client(base_url="http://testserver")
    assert browser.post("/v1/auth/login", json={"name": "aud", "password": PW}).status_code == 200
    session = browser.cookies.get("kasou_session")
    assert session
    cookie = {"Cookie": f"kasou_session={session}", "x-kasou-csrf": "1"}
    # Not signing in again or out: the auditor's session must last the run (both are called with the token).
    skip = ("POST /v1/auth/login", "POST /v1/auth/logout")
    _exercise(run, schema, browser, cookie, {GenerationMode.POSITIVE: EXAMPLES_AS_USER}, skip)
    as_user = run.sent - as_token

    # Last, with the token again, on things that exist (generated names seldom meet them): vm1, its job, the
    # auditor, the built-in pool; these calls may well stop, change or delete them.
    job = env.api.get("/v1/jobs", params={"vm": "vm1"}).json()[0]["id"]
    known = {"name": "vm1", "job_id": job, "user": "aud", "pool": "default", "disk_id": "disk0"}
    _exercise(run, schema, env.api, {}, {GenerationMode.POSITIVE: EXAMPLES_KNOWN}, known=known)

    took = time.monotonic() - t0
    with capsys.disabled():
        print(
            f"\nschemathesis: {run.sent} requests ({as_token} with the token, {as_user} as an auditor, "
            f"{run.sent - as_token - as_user} on things that exist) "
            f"in {took:.1f} s, {len(run.failures)} failures; statuses {dict(sorted(run.statuses.items()))}"
        )
    assert not run.failures, "\n".join(f"{k}: {v}" for k, v in run.failures.items())
