"""One logging set-up for every daemon (``tally ingest``, ``tally compaction watch``).

They log to stderr in the same shape, so an operator reads, greps or ships one format
whichever daemon wrote it: ``text`` for people, or ``json`` for a log collector, one
object per line with ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message`` and,
when a record carries one, ``exception``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import TextIO


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>``, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback's newlines are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(
    fmt: LogFormat = LogFormat.text, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send the process's log records to ``stream`` (stderr) in ``fmt``.

    Replaces a handler an earlier call installed, and leaves others (pytest's) alone.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.json else TextFormatter())
    handler.set_name("tally")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "tally"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
