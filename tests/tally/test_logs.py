from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tally.logs import JsonFormatter, LogFormat, TextFormatter, setup_logging


def _record(exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "ingest.runner", logging.WARNING, __file__, 1, "%s/%s", ("a", "b"), exc_info
    )


def test_a_json_record_is_one_line_with_an_aware_time() -> None:
    record = _record()
    line = JsonFormatter().format(record)
    doc = json.loads(line)
    assert set(doc) == {"time", "level", "logger", "message"}
    assert (doc["level"], doc["logger"], doc["message"]) == ("WARNING", "ingest.runner", "a/b")
    time = datetime.fromisoformat(doc["time"])
    assert time.utcoffset() is not None
    assert abs(time - datetime.fromtimestamp(record.created, UTC)).total_seconds() < 0.001


def test_a_json_record_carries_its_traceback_on_the_same_line() -> None:
    line = JsonFormatter().format(_record(exc=True))
    assert "\n" not in line
    exception = json.loads(line)["exception"]
    assert exception.startswith("Traceback") and "ValueError: bad\nvalue" in exception


def test_a_text_record_starts_with_an_aware_time_and_the_level() -> None:
    line = TextFormatter().format(_record())
    time, level, rest = line.split(" ", 2)
    assert datetime.fromisoformat(time).utcoffset() is not None
    assert (level, rest) == ("WARNING", "ingest.runner: a/b")


@pytest.fixture
def root_handlers() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_handlers")
def test_setup_replaces_its_own_handler_only() -> None:
    first, second = io.StringIO(), io.StringIO()
    others = len(logging.getLogger().handlers)
    setup_logging(LogFormat.text, stream=first)
    setup_logging(LogFormat.json, stream=second)
    assert len(logging.getLogger().handlers) == others + 1
    logging.getLogger("compaction").info("hello")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["message"] == "hello"
