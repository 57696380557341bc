"""Fixtures of the StarRocks tests: a database of each test's own, on the session's
stand-in or on the real StarRocks that ``TALLY_TEST_STARROCKS`` names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.storage.starrocks.standin import StandIn
from tests.storage.starrocks.target import ENV, Target


@pytest.fixture
def sr_settings(starrocks: Target, data_dir: Path, registry: SpecRegistry) -> Settings:
    return starrocks.settings(data_dir, registry)


@pytest.fixture
def standin(starrocks: Target) -> StandIn:
    """The stand-in itself, for what only it can do (script a fault, count the
    requests it saw); skipped against a real StarRocks."""
    if starrocks.standin is None:
        pytest.skip(f"{ENV} points at a real StarRocks: faults cannot be scripted there")
    return starrocks.standin
