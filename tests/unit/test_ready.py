"""``kasou up`` and ``kasou lab up`` return only once the cluster would place a ``vm create``.

Before, they returned as soon as the services answered their health URLs; right after ``lab up`` a
``vm create --start`` once failed with "no host agent answers; is kasou up?" (the leader had not
counted the agents yet).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kasou import services
from kasou.config import Paths
from kasou.errors import KasouError, OperationTimeout
from kasou.lab import hosts as labhosts
from kasou.lab.net import LabError


def host(name: str, state: str = "up", free: int = 4096, cpus: int = 2) -> dict[str, Any]:
    return {"name": name, "state": state, "memory_free_mib": free, "cpus": cpus}


LEADER = {"clustered": True, "leader": "h1", "hosts": ["h1", "h2", "h3"]}
ALL = ["h1", "h2", "h3"]


@pytest.mark.parametrize(
    ("cluster", "hosts", "reason"),
    [
        ({"leader": None}, [], "no control plane leader is elected yet"),
        (LEADER, [host("h1")], "hosts h2, h3 not registered with the control plane"),
        (LEADER, [host("h1"), host("h2")], "host h3 not registered with the control plane"),
        (LEADER, [host("h1"), host("h2"), host("h3", "down")], "the control plane gets no answer from the agent of h3"),
        (LEADER, [host("h1", "maintenance"), host("h2", free=64), host("h3", cpus=0)],
         "no host is up with room for a VM of 128 MiB (in maintenance or full)"),
        (LEADER, [host("h1", "maintenance"), host("h2"), host("h3")], None),
        (LEADER, [host("h1"), host("h2"), host("h3")], None),
    ],
)  # fmt: skip
def test_not_ready_names_what_is_missing(cluster: dict[str, Any], hosts: list[dict[str, Any]], reason: str) -> None:
    assert services.not_ready(cluster, hosts, ALL) == reason


def scripted(answers: list[Any]) -> Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """An ``ask`` that gives each answer in turn (an exception is raised), the last one for ever."""
    calls = {"n": 0}

    def ask() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        a = answers[min(calls["n"], len(answers) - 1)]
        calls["n"] += 1
        if isinstance(a, Exception):
            raise a
        return a  # type: ignore[no-any-return]

    ask.calls = calls  # type: ignore[attr-defined]
    return ask


def test_wait_ready_waits_until_a_create_would_be_placed() -> None:
    ask = scripted([
        KasouError("the API at https://10.88.0.11:8470 does not answer"),
        ({"leader": None}, []),
        (LEADER, [host("h1")]),
        (LEADER, [host("h1"), host("h2"), host("h3")]),
    ])  # fmt: skip
    services.wait_ready(ask, ALL, timeout=10, every=0.01)
    assert ask.calls["n"] == 4  # type: ignore[attr-defined]


def test_wait_ready_gives_up_with_the_last_reason() -> None:
    ask = scripted([(LEADER, [host("h1"), host("h2")])])
    with pytest.raises(OperationTimeout, match=r"did not accept work within 0 s: host h3 not registered"):
        services.wait_ready(ask, ALL, timeout=0.1, every=0.01)


def test_kasou_up_returns_only_once_the_host_would_take_a_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The services already answer; up() still waits for the control plane to count this host's agent."""
    for name in list(__import__("os").environ):
        if name.startswith("KASOU_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KASOU_HOST_NAME", "solo")
    monkeypatch.setattr(services, "service_pid", lambda paths, s: 4242)
    monkeypatch.setattr(services, "_agent_ok", lambda paths, listen=None: True)
    monkeypatch.setattr(services, "_api_ok", lambda url, token, paths: True)
    ask = scripted([({"leader": "solo"}, []), ({"leader": "solo"}, [host("solo")])])
    monkeypatch.setattr(services, "_ask_api", lambda url, token, paths: ask())
    monkeypatch.setattr(services.time, "sleep", lambda s: None)
    paths = Paths.from_env(tmp_path / "home")
    done = services.up(paths)
    assert done["agent"].startswith("already running") and ask.calls["n"] == 2  # type: ignore[attr-defined]
    ask = scripted([({"leader": "solo"}, [host("solo", "down")])])
    monkeypatch.setattr(services, "READY_TIMEOUT", 0.05)
    with pytest.raises(OperationTimeout, match="no answer from the agent of solo"):
        services.up(paths)


def test_the_lab_asks_the_leader_every_host_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = labhosts.Lab(tmp_path / "lab")
    st = lab._plan(3)
    views: dict[tuple[str, str], Any] = {}

    def api_get(h: labhosts.LabHost, path: str, token: str, timeout: float = 5.0) -> Any:
        answer = views.get((h.name, path))
        if answer is None:
            raise LabError(f"the API of {h.name} does not answer")
        return answer

    monkeypatch.setattr(labhosts, "api_get", api_get)
    with pytest.raises(LabError, match="the API of h1 does not answer"):
        lab._views(st, "t")
    for n in ALL:
        views[(n, "/v1/cluster")] = {"leader": None}
    assert lab._views(st, "t") == ({"leader": None}, [])  # not ready: no leader yet
    views[("h1", "/v1/cluster")] = views[("h2", "/v1/cluster")] = {"leader": "h2"}
    assert lab._views(st, "t") == ({"leader": None}, [])  # h3 does not know it yet: a create there would fail
    views[("h3", "/v1/cluster")] = {"leader": "h2"}
    views[("h2", "/v1/hosts")] = [host("h1"), host("h2"), host("h3")]
    cluster, hosts = lab._views(st, "t")
    assert cluster["leader"] == "h2" and services.not_ready(cluster, hosts, ALL) is None
