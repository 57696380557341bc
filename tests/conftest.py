"""Fixtures: each test gets its own data directory, settings, store and reader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from storage import OlapReader, open_reader, open_store
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths

# Speed is measured in bench/, never asserted here: no per-example deadline, which a
# loaded CI machine would trip on a correct implementation.
hypothesis_settings.register_profile("tally", deadline=None)
hypothesis_settings.load_profile("tally")


@pytest.fixture(scope="session")
def registry() -> SpecRegistry:
    return SpecRegistry.load(builtin_spec_paths())


@pytest.fixture(scope="session")
def payments_spec(registry: SpecRegistry) -> DatasourceSpec:
    return registry.get("payments")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tally-data"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, store=StoreSettings(gc_grace_s=0.0, orphan_grace_s=0.0))


@pytest.fixture
def store(settings: Settings, registry: SpecRegistry) -> Iterator[EmbeddedStore]:
    st = open_store(settings, registry)
    assert isinstance(st, EmbeddedStore)
    yield st
    st.close()


@pytest.fixture
def reader(settings: Settings, registry: SpecRegistry) -> Iterator[OlapReader]:
    rd = open_reader(settings, registry)
    yield rd
    rd.close()
