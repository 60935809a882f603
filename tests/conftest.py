"""Fixtures for every kind of test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.config import DEFAULT_STORAGE_ROOTS
from kasou.hypervisor.fake import FakeExports


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


RUN_ROOT = Path("/run/kasou")


@pytest.fixture(autouse=True, scope="session")
def _runtime_dirs_removed() -> Iterator[None]:
    """Each test's kasou home has a runtime directory under /run/kasou (named by the home's hash):
    those the session made are removed at its end, so no test leaves files behind."""
    before = set(os.listdir(RUN_ROOT)) if RUN_ROOT.is_dir() else set()
    yield
    if RUN_ROOT.is_dir():
        for name in set(os.listdir(RUN_ROOT)) - before:
            shutil.rmtree(RUN_ROOT / name, ignore_errors=True)
