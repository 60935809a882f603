"""The CLI's scriptable output (kasou.cli.output): -o table|json|yaml|value, -c, --no-wait, exit codes,
against the whole stack in one process (the fake driver)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kasou.api.client import Client
from kasou.cli import common
from kasou.cli.main import app as cli_app
from kasou.errors import AgentUnavailable
from tests.functional.conftest import TOKEN, Env

Run = Callable[..., str]


@pytest.fixture
def run(env: Env) -> Iterator[Run]:
    runner = CliRunner()
    common.client_factory = lambda: Client("http://testserver", TOKEN, http=env.api)

    def run(*args: str, code: int = 0) -> str:
        r = runner.invoke(cli_app, list(args), env={"COLUMNS": "200"})
        assert r.exit_code == code, (args, r.exit_code, r.output, r.exception)
        return r.stdout

    try:
        yield run
    finally:
        common.client_factory = None


def test_formats_of_a_list(env: Env, run: Run) -> None:
    env.create("a", tags=["emr", "ward-a"])
    env.create("b", department="lab")
    table = run("vm", "list")
    assert "name" in table and "memory" in table and "128 MiB" in table and "emr," in table  # (width: the terminal)
    assert run("vm", "list", "-o", "table") == table
    rows = json.loads(run("vm", "list", "-o", "json"))
    assert [r["name"] for r in rows] == ["a", "b"] and rows[0]["uuid"]  # the API's objects, whole
    assert json.loads(run("vm", "list", "--json")) == rows  # the old flag: -o json
    assert yaml.safe_load(run("vm", "list", "-o", "yaml")) == rows
    lines = run("vm", "list", "-o", "value").splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[:4] == ["a", "stopped", "host1", "1"]
    assert lines[0].split("\t")[-1] == "emr,ward-a"


def test_columns_select_and_order(env: Env, run: Run) -> None:
    env.create("a", department="lab")
    assert run("vm", "list", "-o", "value", "-c", "state", "-c", "name") == "stopped\ta\n"
    assert run("vm", "list", "-o", "value", "-c", "name,department") == "a\tlab\n"  # hidden columns too
    assert json.loads(run("vm", "list", "-o", "json", "-c", "name", "-c", "memory_mib")) == [
        {"name": "a", "memory_mib": 128}
    ]
    assert yaml.safe_load(run("vm", "show", "a", "-o", "yaml", "-c", "state")) == {"state": "stopped"}
    table = run("vm", "list", "-c", "name", "-c", "vcpus")
    assert "vCPU" in table and "state" not in table
    assert run("vm", "show", "a", "-o", "value", "-c", "uuid").strip() == env.api.get("/v1/vms/a").json()["uuid"]
    # an unknown column: a usage error naming the valid ones, before anything is asked
    r = CliRunner().invoke(cli_app, ["vm", "list", "-c", "nmae"], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "unknown column 'nmae'" in r.output and "name, state" in r.output
    r = CliRunner().invoke(cli_app, ["vm", "list", "-o", "xml"], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "table, json, yaml, value" in r.output


def test_actions_wait_or_not(env: Env, run: Run) -> None:
    env.create("a")
    assert run("vm", "start", "a") == "vm a: running\n"  # the usual line
    job = json.loads(run("vm", "stop", "a", "-o", "json"))
    assert job["state"] == "succeeded" and job["kind"] == "stop" and job["vm"] == "a"
    job_id = run("vm", "start", "a", "--no-wait", "-o", "value").strip()
    assert job_id and "\t" not in job_id and "\n" not in job_id
    done = json.loads(run("job", "wait", job_id, "-o", "json"))
    assert done["id"] == job_id and done["state"] == "succeeded"
    assert run("job", "show", job_id, "-o", "value", "-c", "state") == "succeeded\n"
    queued = json.loads(run("vm", "stop", "a", "--no-wait", "-o", "json"))
    assert queued["kind"] == "stop" and queued["state"] in ("pending", "running", "succeeded")
    env.wait(queued)
    assert "job" in run("vm", "start", "a", "--no-wait")  # the table format: one line with the job's id
    out = run("vm", "create", "b", "--image", "tiny", "-o", "yaml")
    assert yaml.safe_load(out)["kind"] == "create"
    assert run("vm", "delete", "b", "-o", "value", "-c", "state") == "succeeded\n"


def test_bulk_actions_print_the_job(env: Env, run: Run) -> None:
    for n in ("a", "b"):
        env.create(n, tags=["ward"])
    job = json.loads(run("vm", "start", "--tag", "ward", "-o", "json"))
    assert job["result"]["succeeded"] == 2
    assert run("vm", "stop", "--all", "-o", "value").strip() != ""


def test_exit_codes(env: Env, run: Run) -> None:
    env.create("a")
    run("vm", "show", "nosuch", code=3)  # not found
    run("vm", "create", "a", "--image", "tiny", code=4)  # exists: conflict
    run("vm", "resume", "a", code=4)  # the wrong state
    run("vm", "create", "x", "--image", "tiny", "--vcpus", "many", code=2)  # bad input: usage
    run("vm", "create", "x", "--image", "tiny", "--vcpus", "1000", code=2)  # the API refuses it (422)
    run("vm", "list", "--bogus", code=2)
    env.driver.fail_next_start = "no room"
    run("vm", "start", "a", code=1)  # a job that failed: its error
    run("vm", "start", "a")
    env.driver.powerdown_exits = env.driver.agent_shutdown_exits = False  # a guest that ignores the button
    job_id = run("vm", "shutdown", "a", "--timeout", "2", "--no-wait", "-o", "value").strip()
    run("job", "wait", job_id, "--timeout", "0.2", code=5)  # not ended in time
    run("job", "wait", job_id, "--timeout", "10")  # stopped hard after its 2 s


def test_vm_wait_for_ready_or_a_state(env: Env, run: Run) -> None:
    env.create("a")
    run("vm", "wait", "a", "--for", "ready", "--timeout", "0.3", code=5)  # stopped, and nobody starts it
    assert run("vm", "wait", "a", "--for", "stopped", "-o", "value", "-c", "state") == "stopped\n"
    run("vm", "start", "a", "--no-wait")
    v = json.loads(run("vm", "wait", "a", "-o", "json", "--timeout", "30"))
    assert v["name"] == "a" and v["state"] == "running" and v["guest_ready"] is True
    assert run("vm", "wait", "a", "--for", "running") == "a: running\n"
    env.driver.crash("a")
    run("vm", "wait", "a", "--for", "ready", "--timeout", "30", code=1)  # crashed: it will not be ready by itself
    run("vm", "wait", "nosuch", code=3)
    # an API that does not answer for a moment (restarted by an upgrade) is waited for; for ever, it times out
    run("vm", "start", "a")
    real, fails = common.client_factory, [2]
    assert real is not None

    class Restarting:
        def get(self, path: str, **kw: object) -> object:
            if fails[0]:
                fails[0] -= 1
                raise AgentUnavailable("the kasou API at http://testserver is not reachable; is kasou up?")
            return real().get(path, **kw)

    common.client_factory = lambda: Restarting()  # type: ignore[assignment]
    assert run("vm", "wait", "a", "--timeout", "30") == "a: ready\n"
    fails[0] = 10**6
    out = CliRunner().invoke(cli_app, ["vm", "wait", "a", "--timeout", "1.5"], env={"COLUMNS": "200"})
    assert out.exit_code == 5 and "not reachable" in out.output, out.output
    common.client_factory = real
    run("vm", "wait", "a", "--for", "happy", code=2)
    run("vm", "wait", "a", "--timeout", "0", code=2)


def test_audit_export_writes_its_file_with_to_and_still_with_output(env: Env, run: Run, tmp_path: Path) -> None:
    env.create("a")  # something in the audit log
    records = json.loads(run("audit", "export"))["records"]
    assert records
    assert yaml.safe_load(run("audit", "export", "-o", "yaml"))["records"] == records
    assert "records written to" in run("audit", "export", "--to", str(tmp_path / "a.json"))
    assert json.loads((tmp_path / "a.json").read_text())["records"] == records
    run("audit", "export", "--output", str(tmp_path / "b.json"))  # the old --output FILE
    assert json.loads((tmp_path / "b.json").read_text())["records"] == records
    run("audit", "export", "-o", str(tmp_path / "c.csv"), "--format", "csv")
    assert (tmp_path / "c.csv").read_text().count("\n") == len(records) + 1
    run("audit", "export", "--to", "x", "--output", "y", code=2)


def test_other_lists_and_shows(env: Env, run: Run) -> None:
    env.create("a")
    env.act("a", "start")
    events = [ln.split("\t") for ln in run("vm", "history", "a", "-o", "value", "-c", "event").splitlines()]
    assert events == [["defined"], ["started"]]
    assert "started" in run("vm", "history", "a")  # the usual lines
    jobs = run("job", "list", "-o", "value", "-c", "kind", "-c", "state").splitlines()
    assert "start\tsucceeded" in jobs
    assert json.loads(run("host", "list", "-o", "json", "-c", "name"))[0] == {"name": "host1"}
    assert run("cluster", "-o", "value", "-c", "clustered") == "false\n"
    assert json.loads(run("network", "create", "clinical", "--vlan", "10", "-o", "json"))["vlan"] == 10
    assert yaml.safe_load(run("network", "list", "-o", "yaml", "-c", "name", "-c", "vlan")) == [
        {"name": "clinical", "vlan": 10}
    ]
    assert json.loads(run("report", "uptime", "--json"))[0]["name"] == "a"
