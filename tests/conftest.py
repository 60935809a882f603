"""Fixtures for every kind of test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.config import DEFAULT_STORAGE_ROOTS
from kasou.hypervisor.qemu import confine
from kasou.lab import etcd as etcd_module
from kasou.lab.etcd import EtcdCluster
from tests.doubles.driver import FakeExports


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, ``timeout``, ``kill``) ends the run as Ctrl-C does: the fixtures' teardowns run,
    so the services, QEMUs, labs and files the tests started do not outlive it. Only in pytest's own process:
    a forked copy of it (pyroute2 forks to enter a network namespace) ends on SIGTERM as before, and never
    runs the session's teardowns."""

    main = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != main:  # a forked copy of this process (pyroute2's namespace helpers): it just ends
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of real parts that share the machine (marker shares_machine: guests booting for minutes, the
    Debian package and its systemd machine, directory servers) first, in their order; then the rest. Two at a
    time (scripts/test.sh, pytest-xdist, a file per worker), the long ones then start at once beside the
    fast ones instead of last, when one worker would run on alone."""

    def rank(item: pytest.Item) -> tuple[bool, int]:
        return item.get_closest_marker("shares_machine") is None, -LONGEST.get(item.path.name, 0)

    items.sort(key=rank)  # stable: each group in its order


# Files of shares_machine tests that take minutes (seconds measured in a whole run, 2026-12-07): the longest
# first, one per worker, so that neither is left for the end.
LONGEST = {"test_debian_image.py": 150, "test_deb.py": 140, "test_firmware_debian.py": 35}


@pytest.fixture(autouse=True, scope="session")
def _no_runtime_dirs_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A kasou home deep in pytest's temporary directory gets its VMs' socket directory under
    /run/kasou/<hash of the home> (kasou.config.Paths.vm_run, a Unix socket path's limit). At the end of the
    session those of its own homes are removed, with their VMs' cgroups (their QEMUs ended with the tests)."""
    yield
    base = tmp_path_factory.getbasetemp().resolve()
    for marker in Path("/run/kasou").glob("*/home"):
        with contextlib.suppress(OSError, ValueError):
            if Path(marker.read_text().strip()).is_relative_to(base):
                confine.remove_all(confine.host_tag(marker.parent / "vms"))
                shutil.rmtree(marker.parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_fake_replicas_across_tests() -> Iterator[None]:
    """The fake hosts' replica daemons live in a process-wide registry: each test starts with none."""
    FakeExports.served.clear()
    yield
    FakeExports.served.clear()


@pytest.fixture(autouse=True, scope="session")
def _storage_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Pools may be made only under the storage roots (KASOU_STORAGE_ROOTS): tests make theirs in their
    temporary directories, so those are a root too, beside the defaults (and so for the services they start)."""
    before = os.environ.get("KASOU_STORAGE_ROOTS")
    roots = [*(before.split(":") if before else DEFAULT_STORAGE_ROOTS), str(tmp_path_factory.getbasetemp())]
    os.environ["KASOU_STORAGE_ROOTS"] = ":".join(roots)
    yield
    if before is None:
        os.environ.pop("KASOU_STORAGE_ROOTS", None)
    else:
        os.environ["KASOU_STORAGE_ROOTS"] = before


@pytest.fixture(autouse=True)
def _recordings_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Console recordings (kasou.control.recording_store) go to the test's own directory."""
    monkeypatch.setenv("KASOU_RECORDING_DIR", str(tmp_path / "recordings"))


RUN_ROOT = Path("/run/kasou")


@pytest.fixture(autouse=True, scope="session")
def _runtime_dirs_removed() -> Iterator[None]:
    """Each test's kasou home has a runtime directory under /run/kasou (named by the home's hash): those made
    during the session whose home is gone are removed at its end, so no test leaves files behind. One whose home
    is still there belongs to a kasou still running: another pytest session's, or another xdist worker's."""
    before = set(os.listdir(RUN_ROOT)) if RUN_ROOT.is_dir() else set()
    yield
    if RUN_ROOT.is_dir():
        for name in set(os.listdir(RUN_ROOT)) - before:
            home = RUN_ROOT / name / "home"
            with contextlib.suppress(OSError):
                if Path(home.read_text().strip()).exists():
                    continue
            shutil.rmtree(RUN_ROOT / name, ignore_errors=True)


# -- KASOU_REQUIRE_ALL=1 (CI): the real tests must run ------------------------------------------
#
# A test that boots real QEMU or a lab (marker ``qemu``), starts etcd (marker ``etcd``) or a directory
# server (marker ``directory``: Samba AD, slapd; tests/ldapservers.py) or drives
# Chromium (anything under tests/browser) may skip on a developer's machine that lacks root, etcd
# or Chromium. With KASOU_REQUIRE_ALL=1, which .ci/run sets, such a skip, whatever raised it
# (pytest.skip in the test or a fixture, a skipif mark, importorskip), is a failure instead, and so
# is a test module under tests/integration or tests/browser that skips as a whole at collection.

REQUIRED_MARKERS = ("qemu", "etcd", "directory")
BROWSER_DIR = ("tests", "browser")
REQUIRED_DIRS = (("tests", "integration"), BROWSER_DIR)


def _all_required() -> bool:
    return os.environ.get("KASOU_REQUIRE_ALL", "") == "1"


def _top_dirs(config: pytest.Config, path: Path) -> tuple[str, ...]:
    try:
        return path.relative_to(config.rootpath).parts[:2]
    except ValueError:
        return ()


def must_run(item: pytest.Item) -> bool:
    """True for a test that may not skip when KASOU_REQUIRE_ALL=1."""
    if any(item.get_closest_marker(m) for m in REQUIRED_MARKERS):
        return True
    return _top_dirs(item.config, item.path) == BROWSER_DIR


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and _all_required() and must_run(item):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped ({_skip_reason(report.longrepr)}), but KASOU_REQUIRE_ALL=1: "
            "real-QEMU, etcd, directory and browser tests must run here"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    report = yield
    if report.skipped and _all_required() and _top_dirs(collector.config, collector.path) in REQUIRED_DIRS:
        report.outcome = "failed"
        report.longrepr = (
            f"{collector.nodeid} skipped ({_skip_reason(report.longrepr)}), but KASOU_REQUIRE_ALL=1: "
            "real-QEMU, etcd, directory and browser tests must run here"
        )
    return report


# -- every test that starts etcd is marked etcd ------------------------------------------------
#
# The fast run (-m "not qemu and not etcd") must not start etcd, and CI must count a skip of such
# a test as a failure; so starting an EtcdCluster from a test without the marker is itself an
# error. (Tests that bring up a lab start etcd through `kasou lab up`; tests/integration/conftest.py
# marks every test that uses a lab.)

_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.fixture(autouse=True, scope="session")
def _etcd_only_in_etcd_tests() -> Iterator[None]:
    start = EtcdCluster.start

    def guarded(self: EtcdCluster, *args: Any, **kwargs: Any) -> Any:
        # (where etcd cannot be found, start refuses before running anything: a unit test of that)
        installed = etcd_module.shutil.which("etcd") is not None
        if installed and _running and _running[-1].get_closest_marker("etcd") is None:
            raise AssertionError(f"{_running[-1].nodeid} starts etcd but is not marked etcd (pytest.mark.etcd)")
        return start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EtcdCluster, "start", guarded)
        yield


# -- real directory servers (marker ``directory``): one Samba AD DC and one slapd per run ----------------


@pytest.fixture(scope="session")
def directory_ca() -> Any:
    from tests.ldapservers import DirectoryCA

    return DirectoryCA.make("kasou test directory CA")


def _directory_server(kind: str, ca: Any) -> Iterator[Any]:
    from tests import ldapservers

    why = ldapservers.tools_missing()
    if why:
        pytest.skip(why)
    with ldapservers.running(kind, ca) as server:
        yield server


@pytest.fixture(scope="session")
def samba_dc(directory_ca: Any) -> Iterator[Any]:
    """A Samba Active Directory domain controller (provisioned once per run, in a namespace of its own)."""
    yield from _directory_server("samba", directory_ca)


@pytest.fixture(scope="session")
def slapd_server(directory_ca: Any) -> Iterator[Any]:
    """OpenLDAP's slapd with the same people and groups (once per run, in a namespace of its own)."""
    yield from _directory_server("slapd", directory_ca)
