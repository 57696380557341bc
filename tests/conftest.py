"""Fixtures: each test gets its own data directory, settings, store and reader."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from engines import maven
from engines.base import engines_home
from ingest.kafka import ensure_topics
from storage import OlapReader, open_reader, open_store
from storage.embedded.store import EmbeddedStore
from tally.settings import IngestSettings, Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths
from tests.brokers import NAMES, Broker, KafkaBroker, missing_tools, start
from tests.druid import Druid, start_druid
from tests.opensearch import OpenSearch, start_opensearch
from tests.storage.starrocks.target import Target
from tests.storage.starrocks.target import start as start_starrocks


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fetch the engines' artifacts from Maven Central in the background while the
    first tests run: on a fresh machine Druid's take minutes to download, which its
    fixture would otherwise wait out later. Resolution is idempotent and file-locked,
    so a fixture that needs an engine first simply waits for it; a failure here is
    left for that fixture to meet and report."""
    if session.config.option.collectonly:
        return
    used = set().union(*(getattr(item, "fixturenames", ()) for item in session.items))
    wanted = [
        name
        for name, fixtures in (
            ("kafka", {"broker", "kafka_broker"}),
            ("druid", {"druid"}),
            ("opensearch", {"opensearch"}),
        )
        if used & fixtures
    ]
    if wanted and missing_tools() is None:
        threading.Thread(target=_resolve, args=(wanted,), name="maven", daemon=True).start()


# Fixtures that start a heavy service once per session, and the group their tests are
# kept in under pytest-xdist (``--dist loadgroup``): one worker starts it, the other
# never does. (Kafka and the development broker are light enough to run per worker.)
_HEAVY = {"druid": "druid", "live": "pages", "opensearch": "opensearch"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test of an engine that is costly to start (Druid: a JVM per service and
    ~45 s) runs on the one worker that starts it: tests taking its fixture, those
    parametrized on it, and the engine's own tests (which start their own)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        group = next((g for name, g in _HEAVY.items() if name in fixtures), None)
        for engine in ("druid", "opensearch"):
            if group is None and engine in item.nodeid.lower():
                group = engine
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def _resolve(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(Exception):
            maven.resolve(name, engines_home())


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


# --- brokers: each started once per session; ``broker`` runs a test on both ----------------


@pytest.fixture(scope="session")
def _brokers() -> Iterator[dict[str, Broker]]:
    started: dict[str, Broker] = {}
    yield started
    for running in started.values():
        running.stop()


def _broker(name: str, started: dict[str, Broker], where: pytest.TempPathFactory) -> Broker:
    if name not in started:
        started[name] = start(name, where.mktemp(f"broker-{name}"))
    return started[name]


@pytest.fixture(scope="session", params=NAMES)
def broker(
    request: pytest.FixtureRequest,
    _brokers: dict[str, Broker],
    tmp_path_factory: pytest.TempPathFactory,
) -> Broker:
    """The development broker, then Apache Kafka: a test taking it runs on both."""
    return _broker(request.param, _brokers, tmp_path_factory)


@pytest.fixture(scope="session")
def dev_broker(_brokers: dict[str, Broker], tmp_path_factory: pytest.TempPathFactory) -> Broker:
    """The development broker alone, what ``make demo`` runs on."""
    return _broker("tansu", _brokers, tmp_path_factory)


@pytest.fixture(scope="session")
def kafka_broker(
    _brokers: dict[str, Broker], tmp_path_factory: pytest.TempPathFactory
) -> KafkaBroker:
    """Apache Kafka alone, for what only a real Kafka makes possible (the same process
    as ``broker``'s Kafka half)."""
    kafka = _broker("kafka", _brokers, tmp_path_factory)
    assert isinstance(kafka, KafkaBroker)
    return kafka


def broker_settings(broker: Broker, data_dir: Path, partitions: int = 6) -> Settings:
    """Settings of one test on ``broker``: its own topics and groups (a namespace), its
    own data directory, short lingers, and a 3 s session timeout (both brokers take it:
    the local Kafka lowers its floor), so a killed member's partitions move soon."""
    return Settings(
        data_dir=data_dir,
        kafka_bootstrap=broker.bootstrap,
        topic_namespace=f"t{uuid.uuid4().hex[:10]}.",
        store=StoreSettings(gc_grace_s=0.0),
        ingest=IngestSettings(
            batch_max_wait_s=0.1,
            search_refresh_s=0.1,
            partitions=partitions,
            session_timeout_ms=3000,
        ),
    )


@pytest.fixture
def kafka_settings(broker: Broker, data_dir: Path) -> Settings:
    return broker_settings(broker, data_dir)


@pytest.fixture
def topics(kafka_settings: Settings, registry: SpecRegistry) -> Settings:
    ensure_topics(kafka_settings, registry)
    return kafka_settings


# --- Apache Druid: started once per session, for every test that needs a real one ---------


@pytest.fixture(scope="session")
def starrocks() -> Iterator[Target]:
    """StarRocks for the session: a real one where TALLY_TEST_STARROCKS names it,
    else the local stand-in (no StarRocks can run on this machine)."""
    target = start_starrocks()
    yield target
    if target.standin is not None:
        target.standin.stop()


@pytest.fixture(scope="session")
def druid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Druid]:
    """A real Druid (``tally engines up druid``) in its own data dir; stopped at the end."""
    running = start_druid(tmp_path_factory.mktemp("druid"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def opensearch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenSearch]:
    """A real OpenSearch (``tally engines up opensearch``) in its own data dir."""
    running = start_opensearch(tmp_path_factory.mktemp("opensearch"))
    yield running
    running.stop()
