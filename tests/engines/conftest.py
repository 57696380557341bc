"""One real Kafka (``engines.kafka``) per test session, started through the engines module.

Without Java or Maven the Kafka tests are skipped with the reason; with
``TALLY_TEST_ENGINES=required`` (CI on a machine that has both) they fail instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.kafka import KafkaEngine
from tests.brokers import KafkaBroker


@pytest.fixture(scope="session")
def kafka(kafka_broker: KafkaBroker) -> KafkaEngine:
    """The session's Kafka (the one every broker test's Kafka half runs on)."""
    return kafka_broker.engine


@pytest.fixture
def kafka_data_dir(kafka: KafkaEngine) -> Path:
    """The data dir the session's Kafka belongs to (what TALLY_DATA_DIR must say)."""
    return kafka.dir.parent.parent
