"""The real Apache Druid every Druid test runs on (``engines.druid``), started once per
test session by the ``druid`` fixture, and the few HTTP calls the tests make to it.

Without Java or Maven the Druid tests are skipped with a one-line reason; with
``TALLY_TEST_ENGINES=required`` they fail instead. The helpers poll a condition with a
deadline: Druid is eventually consistent (a task's segments reach the broker seconds
after the task succeeds).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

import engines
from engines.druid import DruidEngine
from tally.errors import EngineUnavailable, TallyError
from tests.brokers import missing_tools, not_available

T = TypeVar("T")


class Druid:
    """A running Druid: its URLs, its data dir, and SQL and task calls."""

    def __init__(self, data_dir: Path) -> None:
        engine = engines.get("druid", data_dir)
        assert isinstance(engine, DruidEngine)
        self.engine = engine
        self.data_dir = data_dir
        engine.up()
        broker, coordinator = engine.url("broker"), engine.url("coordinator")
        assert broker is not None and coordinator is not None
        self.broker_url = broker
        self.coordinator_url = coordinator
        self.overlord_url = coordinator  # the coordinator acts as overlord

    def sql(self, query: str, timeout_s: float = 30.0) -> list[list[Any]]:
        """Rows of ``query`` (``resultFormat: array``); HTTPStatusError on an error."""
        got = httpx.post(
            f"{self.broker_url}/druid/v2/sql",
            json={"query": query, "resultFormat": "array"},
            timeout=timeout_s,
        )
        got.raise_for_status()
        rows: list[list[Any]] = got.json()
        return rows

    def submit_task(self, spec: dict[str, Any]) -> str:
        got = httpx.post(f"{self.overlord_url}/druid/indexer/v1/task", json=spec, timeout=30)
        got.raise_for_status()
        task: str = got.json()["task"]
        return task

    def task_status(self, task: str) -> dict[str, Any]:
        url = f"{self.overlord_url}/druid/indexer/v1/task/{task}/status"
        status: dict[str, Any] = httpx.get(url, timeout=30).json()["status"]
        return status

    def wait_task(self, task: str, timeout_s: float = 180.0) -> dict[str, Any]:
        """The task's final status (SUCCESS or FAILED) once it is not running."""

        def done() -> dict[str, Any] | None:
            status = self.task_status(task)
            return None if status["status"] == "RUNNING" else status

        return poll(done, timeout_s, f"task {task} still running")

    def count(self, datasource: str) -> int | None:
        """``COUNT(*)`` of ``datasource``; None while the broker does not know it yet."""
        try:
            rows = self.sql(f'SELECT COUNT(*) FROM "{datasource}"')
        except httpx.HTTPStatusError:
            return None
        return int(rows[0][0])

    def handoff(self, supervisor: str) -> None:
        """Ask the supervisor's task group 0 to publish now (Druid 30+ early handoff):
        its segments and their end offsets go to the metadata store in one CAS."""
        got = httpx.post(
            f"{self.overlord_url}/druid/indexer/v1/supervisor/{supervisor}/taskGroups/handoff",
            json={"taskGroupIds": [0]},
            timeout=30,
        )
        got.raise_for_status()

    def published_segments(self, datasource: str) -> list[str]:
        rows = self.sql(
            "SELECT segment_id FROM sys.segments"
            f" WHERE datasource = '{datasource}' AND is_published = 1"
        )
        return [str(r[0]) for r in rows]

    def drop(self, *supervisors: str) -> None:
        """A test's supervisors terminated and their tasks shut down. Terminated alone,
        a task publishes and waits for handoff first, holding one of the indexer's
        slots meanwhile (for ever, if the test's Kafka is gone): the next tests' tasks
        would queue behind it."""
        tasks = f"{self.overlord_url}/druid/indexer/v1"
        for supervisor in supervisors:
            httpx.post(f"{tasks}/supervisor/{supervisor}/terminate", timeout=30)
        for state in ("runningTasks", "pendingTasks", "waitingTasks"):
            for task in httpx.get(f"{tasks}/{state}", timeout=30).json():
                if task.get("dataSource") in supervisors:
                    httpx.post(f"{tasks}/task/{task['id']}/shutdown", timeout=30)

    keep = False  # a developer's Druid (TALLY_TEST_DRUID_DIR): not stopped by tests

    def stop(self) -> None:
        if self.keep:
            return
        with contextlib.suppress(TallyError):
            self.engine.stop()


def poll(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """``check()``'s first answer that is not None, retried until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except httpx.TransportError:
            got = None  # a service restarting: ask again
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:g}s: {what}")
        time.sleep(0.5)


def start_druid(where: Path) -> Druid:
    """Druid under ``where``; a skip (or a failure) with the reason where it cannot run.

    ``TALLY_TEST_DRUID_DIR`` (a developer's loop): that data dir instead, started if
    it is not running, and left running after the session (``Druid.keep``)."""
    kept = os.environ.get("TALLY_TEST_DRUID_DIR")
    if kept:
        where = Path(kept)
    if (reason := missing_tools("druid")) is not None:
        not_available(reason)
    try:
        running = Druid(where)
        running.keep = bool(kept)
        return running
    except EngineUnavailable as exc:
        not_available(exc.message)
        raise
