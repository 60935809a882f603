"""Fixtures for every kind of test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kasou.hypervisor.fake import FakeExports


@pytest.fixture(autouse=True)
def _no_fake_replicas_across_tests() -> Iterator[None]:
    """The fake hosts' replica daemons live in a process-wide registry: each test starts with none."""
    FakeExports.served.clear()
    yield
    FakeExports.served.clear()
