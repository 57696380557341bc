"""Ingest processes as an operator runs them (the brokers are in ``tests/conftest.py``:
every test on both, each with its own topic namespace and data directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally.settings import Settings
from tests.brokers import free_port

__all__ = ["env_for", "free_port", "start_ingest"]


def env_for(settings: Settings) -> dict[str, str]:
    return (
        {
            **os.environ,
            "TALLY_DATA_DIR": str(settings.data_dir),
            "TALLY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TALLY_TOPIC_NAMESPACE": settings.topic_namespace,
            "TALLY_INGEST__BATCH_MAX_WAIT_S": str(settings.ingest.batch_max_wait_s),
            "TALLY_INGEST__SEARCH_REFRESH_S": str(settings.ingest.search_refresh_s),
            "TALLY_INGEST__BATCH_MAX_ROWS": str(settings.ingest.batch_max_rows),
            "TALLY_INGEST__SESSION_TIMEOUT_MS": str(settings.ingest.session_timeout_ms),
            "TALLY_INGEST__TRANSACTION_TIMEOUT_S": str(settings.ingest.transaction_timeout_s),
            "TALLY_STORE__BACKEND": settings.store.backend,
            "TALLY_STORE__GC_GRACE_S": "0",
            "TALLY_STORE__BUSY_TIMEOUT_S": str(settings.store.busy_timeout_s),
        }
        | ({"TALLY_SPECS": json.dumps([str(p) for p in settings.specs])} if settings.specs else {})
        | {
            f"TALLY_DRUID__{name.upper()}": url
            for name in ("broker_url", "overlord_url", "coordinator_url")
            if (url := getattr(settings.druid, name)) is not None
        }
        | {
            f"TALLY_SEARCH__{name.upper()}": str(value)
            for name, value in settings.search.model_dump().items()
            if value is not None and name != "password"
        }
        | {
            f"TALLY_STARROCKS__{name.upper()}": str(value)
            for name, value in settings.starrocks.model_dump().items()
            if value is not None and name != "password"
        }
        | (
            {"TALLY_STARROCKS__PASSWORD": settings.starrocks.password.get_secret_value()}
            if settings.starrocks.password is not None
            else {}
        )
    )


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
