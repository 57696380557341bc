"""Settings of one test on the session's real Druid: its own datasource (a namespace)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.druid.reader import DruidReader
from tally.settings import DruidSettings, Settings, StoreSettings
from tally.specs import SpecRegistry
from tests.druid import Druid


def druid_settings(druid: Druid, data_dir: Path, base: Settings | None = None) -> Settings:
    """``base`` (or defaults) on the Druid backend, with a namespace of its own."""
    base = base or Settings(data_dir=data_dir, topic_namespace=f"t{uuid.uuid4().hex[:10]}_")
    return base.model_copy(
        update={
            "store": StoreSettings(backend="druid", gc_grace_s=0.0),
            "druid": DruidSettings(
                broker_url=druid.broker_url,
                overlord_url=druid.overlord_url,
                coordinator_url=druid.coordinator_url,
            ),
        }
    )


@pytest.fixture
def dsettings(druid: Druid, data_dir: Path) -> Settings:
    return druid_settings(druid, data_dir)


@pytest.fixture
def dreader(dsettings: Settings, registry: SpecRegistry) -> Iterator[DruidReader]:
    reader = DruidReader(dsettings, registry)
    yield reader
    reader.close()
