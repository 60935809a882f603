"""KASOU_REQUIRE_ALL=1 (set by CI): a real-QEMU, etcd, directory or browser test that skips fails the run.

Each case runs a tiny test module in pytest's own ``pytester`` (in process), with kasou's
tests/conftest.py hooks imported into its conftest, once with the variable and once without.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = "from tests.conftest import *  # noqa: F403  (kasou's hooks)\n"
INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
markers =
    qemu: boots real QEMU
    etcd: starts real etcd
    directory: starts real directory servers
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, require: bool, **files: str) -> pytest.RunResult:
    if require:
        monkeypatch.setenv("KASOU_REQUIRE_ALL", "1")
    else:
        monkeypatch.delenv("KASOU_REQUIRE_ALL", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    for path, text in files.items():
        p = pytester.path / (path.replace("__", "/") + ".py")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rfEs")


SKIPPED_QEMU = """
import pytest

@pytest.mark.qemu
def test_boots_a_guest():
    pytest.skip("no QEMU here")

def test_plain():
    pass
"""


def test_a_skipped_qemu_test_fails_the_run_when_all_are_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _run(pytester, monkeypatch, True, test_inner=SKIPPED_QEMU)
    r.assert_outcomes(passed=1, failed=1)
    assert r.ret != 0
    r.stdout.fnmatch_lines(["*test_boots_a_guest*skipped (no QEMU here)*KASOU_REQUIRE_ALL=1*"])


def test_without_the_variable_it_skips(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _run(pytester, monkeypatch, False, test_inner=SKIPPED_QEMU)
    r.assert_outcomes(passed=1, skipped=1)
    assert r.ret == 0
    r.stdout.fnmatch_lines(["SKIPPED*no QEMU here*"])  # the skip summary names it


def test_skipif_marks_fixture_skips_and_etcd_params_count_too(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = """
import pytest

@pytest.fixture
def etcd_endpoints():
    pytest.skip("etcd is not installed")

@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def store(request):
    return request.getfixturevalue("etcd_endpoints") if request.param == "etcd" else "sqlite"

def test_contract(store):
    pass

@pytest.mark.qemu
@pytest.mark.skipif(True, reason="needs root")
def test_as_root():
    pass

@pytest.mark.skipif(True, reason="an optional tool")
def test_unit_with_an_optional_tool():
    pass
"""
    r = _run(pytester, monkeypatch, True, test_inner=inner)
    # skips in setup (fixtures, skipif) become errors at setup; only the unmarked unit test may skip
    r.assert_outcomes(passed=1, errors=2, skipped=1)
    r.stdout.fnmatch_lines(["*test_contract?etcd?*skipped*", "*test_as_root*skipped (needs root)*"])
    r = _run(pytester, monkeypatch, False, test_inner=inner)
    r.assert_outcomes(passed=1, skipped=3)


def test_a_browser_test_and_a_skipped_integration_module_fail_too(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    browser = "import pytest\n\ndef test_page():\n    pytest.skip('chromium is not installed')\n"
    module = "import pytest\n\npytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n"
    r = _run(pytester, monkeypatch, True, tests__browser__test_b=browser)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*test_page*skipped (chromium is not installed)*KASOU_REQUIRE_ALL=1*"])
    r = _run(pytester, monkeypatch, True, tests__integration__test_i=module)
    assert r.ret != 0  # a collection error: the run stops
    r.stdout.fnmatch_lines(["*tests/integration/test_i.py*skipped*no_such_module_here*KASOU_REQUIRE_ALL=1*"])
    r = _run(pytester, monkeypatch, False, tests__browser__test_b=browser, tests__integration__test_i=module)
    r.assert_outcomes(skipped=2)
    assert r.ret == 0


def test_a_test_that_starts_etcd_without_the_etcd_marker_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = """
from kasou.lab.etcd import EtcdCluster

def test_starts_etcd(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        cluster.start(timeout=30)
    finally:
        cluster.stop()
"""
    r = _run(pytester, monkeypatch, False, test_inner=inner)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*test_starts_etcd starts etcd but is not marked etcd*"])


SKIPPED_DIRECTORY = """
import pytest

@pytest.mark.directory
def test_signs_in_against_samba(samba_dc):
    pass
"""


def test_a_directory_test_without_samba_fails_the_run_when_all_are_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import ldapservers

    monkeypatch.setattr(ldapservers, "tools_missing", lambda: "samba is not installed")
    r = _run(pytester, monkeypatch, True, test_inner=SKIPPED_DIRECTORY)
    r.assert_outcomes(errors=1)  # the session fixture's skip, at the test's setup: the run fails
    assert r.ret != 0
    r.stdout.fnmatch_lines(["*test_signs_in_against_samba*skipped (samba is not installed)*KASOU_REQUIRE_ALL=1*"])
    r = _run(pytester, monkeypatch, False, test_inner=SKIPPED_DIRECTORY)
    r.assert_outcomes(skipped=1)
