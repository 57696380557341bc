"""One real Kafka (``engines.kafka``) per test session, started through the engines module.

Without Java or Maven the Kafka tests are skipped with the reason; with
``TALLY_TEST_ENGINES=required`` (CI on a machine that has both) they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import engines
from engines import maven
from engines.base import engines_home
from engines.kafka import KafkaEngine
from tally.errors import EngineUnavailable, TallyError


def _required() -> bool:
    return os.environ.get("TALLY_TEST_ENGINES", "").lower() == "required"


def not_available(reason: str) -> None:
    """Skip (or fail, when engines are required) with a one-line reason."""
    if _required():
        pytest.fail(f"TALLY_TEST_ENGINES=required but {reason}")
    pytest.skip(reason)


def missing_tools(engine: str = "kafka") -> str | None:
    if shutil.which("java") is None:
        return "java is not on PATH"
    digest = maven.pom_digest(maven.pom_path(engine))
    resolved = (engines_home() / engine / digest / "resolved").exists()
    if shutil.which("mvn") is None and not resolved:
        return "mvn is not on PATH (and the engine's artifacts are not cached)"
    return None


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaEngine]:
    if (reason := missing_tools()) is not None:
        not_available(reason)
    engine = engines.get("kafka", tmp_path_factory.mktemp("engines-data"))
    assert isinstance(engine, KafkaEngine)
    try:
        engine.up()
    except EngineUnavailable as exc:
        not_available(exc.message)
    yield engine
    with contextlib.suppress(TallyError):
        engine.stop()


@pytest.fixture
def kafka_data_dir(kafka: KafkaEngine) -> Path:
    """The data dir the session's Kafka belongs to (what TALLY_DATA_DIR must say)."""
    return kafka.dir.parent.parent
