"""Fixtures for every kind of test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doubles.driver import FakeExports


@pytest.fixture(autouse=True)
def _no_fake_replicas_across_tests() -> Iterator[None]:
    """The fake hosts' replica daemons live in a process-wide registry: each test starts with none."""
    FakeExports.served.clear()
    yield
    FakeExports.served.clear()


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
