"""The compaction journal: each run the watcher (or ``tally compaction run``) finished,
in a small SQLite file beside the catalog, for operators (the console, the admin API).

Prometheus' histograms say how long compactions took in aggregate; an operator asking
"what did it do to 2026-11-03, and how long after the late write?" needs the runs
themselves. The journal is a record, not state: nothing reads it to decide anything,
it keeps the newest ``KEEP`` runs, and losing it loses only history. One file for
every backend (the runs are the watcher's, whichever engine compacted).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from compaction.policy import Done
from tally.errors import StoreUnavailable
from tally.timeutil import utc_iso

KEEP = 5000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    datasource TEXT NOT NULL,
    partition TEXT NOT NULL,
    kind TEXT NOT NULL,
    segments_in INTEGER NOT NULL,
    rows_in INTEGER,
    rows_out INTEGER,
    bytes_in INTEGER,
    bytes_out INTEGER,
    due_since TEXT,
    started_at TEXT,
    finished_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Run:
    datasource: str
    partition: str
    kind: str
    segments_in: int
    rows_in: int | None
    rows_out: int | None
    bytes_in: int | None
    bytes_out: int | None
    due_since: datetime | None
    started_at: datetime | None
    finished_at: datetime

    @property
    def detect_to_done_s(self) -> float | None:
        since = self.due_since
        return None if since is None else (self.finished_at - since).total_seconds()


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


class Journal:
    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection per call: the watcher records from its task threads, the API
        reads from its workers, and a file this small opens in microseconds."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=10)) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                with conn:
                    yield conn
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"compaction journal {self.path.name}: {exc}") from exc

    def record(self, done: Done) -> None:
        task, result = done.task, done.result
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO runs (datasource, partition, kind, segments_in, rows_in, rows_out,"
                " bytes_in, bytes_out, due_since, started_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task.datasource,
                    result.partition if result else task.partition,  # a pack names its days
                    task.kind,
                    len(task.segment_ids),
                    result.rows_in if result else None,
                    result.rows_out if result else None,
                    result.bytes_in if result else None,
                    result.bytes_out if result else None,
                    utc_iso(task.due_since),
                    utc_iso(done.started_at),
                    utc_iso(done.finished_at),
                ),
            )
            conn.execute(
                "DELETE FROM runs WHERE id <= (SELECT max(id) FROM runs) - ?", (self.keep,)
            )

    def recent(self, limit: int = 50, datasource: str | None = None) -> list[Run]:
        """The newest runs first."""
        if not self.path.exists():
            return []
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT datasource, partition, kind, segments_in, rows_in, rows_out, bytes_in,"
                " bytes_out, due_since, started_at, finished_at FROM runs"
                " WHERE ?1 IS NULL OR datasource = ?1 ORDER BY id DESC LIMIT ?2",
                (datasource, limit),
            ).fetchall()
        return [
            Run(
                datasource=row[0],
                partition=row[1],
                kind=row[2],
                segments_in=row[3],
                rows_in=row[4],
                rows_out=row[5],
                bytes_in=row[6],
                bytes_out=row[7],
                due_since=_time(row[8]),
                started_at=_time(row[9]),
                finished_at=datetime.fromisoformat(row[10]),
            )
            for row in rows
        ]
