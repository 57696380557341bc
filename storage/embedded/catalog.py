"""The transactional catalog: live segments, consumer offsets, partition statistics.

SQLite in WAL mode: one writer at a time (``BEGIN IMMEDIATE``), any number of
readers in other processes, each seeing an atomic snapshot. ``synchronous=FULL`` so
a committed transaction — and the offsets it stores — survives power loss, which is
what lets offsets be committed in the same transaction as the segments they cover.

``seq`` numbers commits in order; a compacted segment takes the greatest seq of
what it replaced, so "live segments with seq > N" is always a superset of what
was committed after N — which is how a writer's key index catches up.

A *pack* is one file holding several cold partitions (see ``compaction.policy``):
it has one segment row per partition, all with the same path and ``packed`` set,
and each partition reads only its own time range from it. A file is deleted once no
segment row refers to it any more.

Only a writer creates the schema: on opening, in one ``BEGIN IMMEDIATE`` transaction
of idempotent ``IF NOT EXISTS`` DDL, so two writers opening at once (an ingester and
``tally compaction status``) serialise on the write lock and the second finds it
done — no race. A reader (``readonly``: the query API, ``tally sql``, progress
pollers) never does: that would make every reader contend with ingestion for the
write lock, fail where the catalog is not writable, and change what it reads. So a
reader may meet a catalog its writer has not initialised yet — an empty file, or
one a writer is initialising right now — and a table that does not exist yet reads
as empty: no segments, no offsets, generation 0, exactly what a new catalog holds.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from storage.protocol import Damage, DeadLetterRecord, SegmentInfo
from tally.errors import StoreBusy, StoreError, StoreFileError, StoreFull, StoreUnavailable

SCHEMA_VERSION = 4

_SEGMENTS = """
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    datasource TEXT NOT NULL,
    partition TEXT NOT NULL,
    path TEXT NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL,
    replaced_at REAL,
    packed INTEGER NOT NULL DEFAULT 0,
    digest TEXT, file_bytes INTEGER,
    UNIQUE (path, partition)
)"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema_version', {SCHEMA_VERSION}), ('generation', 0),
    ('seq', 0), ('identity', random() & 9223372036854775807);
{_SEGMENTS};
CREATE INDEX IF NOT EXISTS segments_live ON segments (datasource, partition)
    WHERE replaced_at IS NULL;
CREATE INDEX IF NOT EXISTS segments_replaced ON segments (replaced_at)
    WHERE replaced_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS segments_path ON segments (path);
CREATE TABLE IF NOT EXISTS offsets (
    datasource TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, updated_at REAL NOT NULL,
    log_id TEXT, reset TEXT,
    PRIMARY KEY (datasource, topic, partition)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    datasource TEXT NOT NULL, sink TEXT NOT NULL,
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    key BLOB, value BLOB, reason TEXT NOT NULL, failed_at REAL NOT NULL,
    published_at REAL, dlq_partition INTEGER, dlq_offset INTEGER
);
CREATE INDEX IF NOT EXISTS dead_letters_pending ON dead_letters (datasource)
    WHERE published_at IS NULL;
CREATE TABLE IF NOT EXISTS damage (
    path TEXT PRIMARY KEY, reason TEXT NOT NULL, found_at REAL NOT NULL, found_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS partition_stats (
    datasource TEXT NOT NULL, partition TEXT NOT NULL,
    late_rows INTEGER NOT NULL DEFAULT 0,
    last_write_at REAL, last_compacted_at REAL, newest_event_at REAL,
    PRIMARY KEY (datasource, partition)
);
"""  # noqa: S608 (constants only)


@dataclass(frozen=True)
class NewSegment:
    datasource: str
    partition: str
    path: str
    rows: int
    bytes: int
    digest: str | None = None  # of the whole file (None: written before digests existed)


@dataclass(frozen=True)
class FileRecord:
    """A live segment file as the catalog knows it (a pack: one record, all its
    partitions): what a check compares the file on disk with."""

    path: str
    datasource: str
    partitions: tuple[str, ...]
    file_bytes: int | None
    digest: str | None


# Primary result codes (the low byte of an extended one), https://sqlite.org/rescode.html
_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED: another process holds the lock
_FULL = {13}  # SQLITE_FULL: the disk, or max_page_count
_FILE = {3, 8, 10, 11, 14, 26}  # PERM, READONLY, IOERR, CORRUPT, CANTOPEN, NOTADB
_PASSING = {7, 15, 17}  # NOMEM, PROTOCOL (a WAL lock race), SCHEMA (changed mid-statement)


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _locked(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return _code(exc) in _BUSY or (
        isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
    )


def _translate(exc: sqlite3.Error, path: Path, what: str) -> StoreError:
    """One line naming the catalog, marked transient only where a retry can succeed:
    a lock (ingestion retries the batch) or a passing engine condition. A full disk,
    an I/O error, a read-only or corrupt file need an operator; anything else is a
    bug. Neither is retried."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    code = _code(exc)
    if _locked(exc):
        return StoreBusy(f"catalog {path} is busy ({what}): {text}")
    if code in _FULL:
        return StoreFull(f"catalog {path} is full ({what}): {text}; free disk space, then restart")
    if code in _FILE:
        return StoreFileError(f"catalog {path} cannot be used ({what}): {text}")
    if code in _PASSING:
        return StoreUnavailable(f"catalog {path} unavailable ({what}): {text}")
    return StoreError(f"catalog {path} failed ({what}): {text}")


class Catalog:
    """One connection to the catalog. Not shared between threads."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 60.0, readonly: bool = False):
        self.path = path
        self._tables: frozenset[str] = frozenset()  # seen to exist (once created, a table stays)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            # Opening beside a busy process once failed at once with "database is
            # locked" (an ingest process starting next to another, in CI) although the
            # busy timeout should have waited: retry within that timeout.
            deadline = time.monotonic() + busy_timeout_s
            while True:
                try:
                    self._setup(busy_timeout_s, readonly)
                    break
                except sqlite3.OperationalError as exc:
                    if not _locked(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
        except sqlite3.Error as exc:
            raise _translate(exc, path, "opening") from exc
        except OSError as exc:  # creating its directory
            raise StoreFileError(f"catalog {path} cannot be created: {exc}") from exc

    def _setup(self, busy_timeout_s: float, readonly: bool) -> None:
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        self._con.execute("PRAGMA cache_size=-262144")  # 256 MiB for the key index
        self._con.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        if readonly:
            self._con.execute("PRAGMA query_only=ON")
            return
        self._con.execute("BEGIN IMMEDIATE")
        try:
            _migrate(self._con)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._con.execute(statement)
            self._con.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise

    def close(self) -> None:
        self._con.close()

    def _abandon(self) -> None:
        """Roll back whatever is still open. SQLite itself rolls the whole transaction
        back on some errors (a full disk, an I/O error): an unconditional ROLLBACK would
        then fail and replace the error that matters with "no transaction is active"."""
        with suppress(sqlite3.Error):  # the error being raised says more; close() rolls back
            if self._con.in_transaction:
                self._con.execute("ROLLBACK")

    # --- transactions -------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: serialises writers across processes.

        A sqlite3 error anywhere inside — the body's statements too — leaves as a
        :class:`~tally.errors.StoreError` (see ``_translate``), so that ingestion can
        tell a lock (retry) from a full disk (stop) and never mistakes either for a bug.
        """
        with self._transaction("BEGIN IMMEDIATE", "write", "commit") as con:
            yield con

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one snapshot. After a failed
        ``BEGIN`` there is nothing to end (and ending someone else's transaction would
        be worse): its error is raised, translated, and nothing else is run."""
        with self._transaction("BEGIN", "read", "end read") as con:
            yield con

    @contextmanager
    def _transaction(self, begin: str, what: str, end: str) -> Iterator[sqlite3.Connection]:
        try:
            self._con.execute(begin)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, f"begin {what}") from exc
        try:
            yield self._con
        except sqlite3.Error as exc:
            self._abandon()
            raise _translate(exc, self.path, what) from exc
        except BaseException:
            self._abandon()
            raise
        else:
            try:
                self._con.execute("COMMIT")
            except sqlite3.Error as exc:
                self._abandon()
                raise _translate(exc, self.path, end) from exc

    # --- reads (call inside read() or write()) ---------------------------------------

    def _has(self, *tables: str) -> bool:
        """Whether ``tables`` exist in this snapshot (see the module docstring: until a
        writer has created them they read as empty). Cheap once they have been seen."""
        if self._tables.issuperset(tables):
            return True
        rows = self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        self._tables = frozenset(r[0] for r in rows)
        return self._tables.issuperset(tables)

    def generation(self) -> int:
        if not self._has("meta"):
            return 0
        row = self._con.execute("SELECT v FROM meta WHERE k='generation'").fetchone()
        return int(row[0])

    def live_segments(self, datasource: str | None = None) -> list[SegmentInfo]:
        if not self._has("segments"):
            return []
        sql = (
            "SELECT id, datasource, partition, path, rows, bytes, seq, created_at, packed "
            "FROM segments WHERE replaced_at IS NULL"
        )
        args: tuple[str, ...] = ()
        if datasource is not None:
            sql += " AND datasource = ?"
            args = (datasource,)
        return [_segment(r) for r in self._con.execute(sql + " ORDER BY seq", args)]

    def partition_segments(self, datasource: str, partition: str) -> list[SegmentInfo]:
        if not self._has("segments"):
            return []
        return [
            _segment(r)
            for r in self._con.execute(
                "SELECT id, datasource, partition, path, rows, bytes, seq, created_at, packed "
                "FROM segments WHERE replaced_at IS NULL AND datasource=? AND partition=? "
                "ORDER BY seq",
                (datasource, partition),
            )
        ]

    def offsets(self, datasource: str) -> dict[tuple[str, int], int]:
        return {tp: offset for tp, (offset, _log, _reset) in self.positions(datasource).items()}

    def positions(
        self, datasource: str
    ) -> dict[tuple[str, int], tuple[int, str | None, str | None]]:
        """(topic, partition) → (next offset, the log it is of, its last reset)."""
        if not self._has("offsets"):
            return {}
        rows = self._con.execute(
            "SELECT topic, partition, next_offset, log_id, reset FROM offsets WHERE datasource=?",
            (datasource,),
        )
        return {(t, p): (o, log, reset) for t, p, o, log, reset in rows}

    def reset_positions(
        self, datasource: str, positions: dict[tuple[str, int], tuple[int, str | None, str]]
    ) -> None:
        """Set positions unconditionally (an operator's reset), noting the reset."""
        now = time.time()
        self._con.executemany(
            "INSERT INTO offsets VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (datasource, topic, partition) DO UPDATE"
            " SET next_offset = excluded.next_offset, updated_at = excluded.updated_at,"
            " log_id = excluded.log_id, reset = excluded.reset",
            [
                (datasource, t, p, offset, now, log, note)
                for (t, p), (offset, log, note) in positions.items()
            ],
        )

    def stats_rows(self, datasources: Sequence[str] | None) -> list[tuple[object, ...]]:
        if not self._has("segments", "partition_stats"):
            return []
        sql = """
            SELECT s.datasource, s.partition, COUNT(s.id), COALESCE(SUM(s.rows), 0),
                   COALESCE(SUM(s.bytes), 0), COALESCE(p.late_rows, 0),
                   p.last_write_at, p.last_compacted_at
            FROM segments s LEFT JOIN partition_stats p
              ON p.datasource = s.datasource AND p.partition = s.partition
            WHERE s.replaced_at IS NULL {cond}
            GROUP BY s.datasource, s.partition ORDER BY s.datasource, s.partition
        """
        if datasources is None:
            return list(self._con.execute(sql.format(cond="")))
        cond = "AND s.datasource IN (SELECT value FROM json_each(?))"
        return list(self._con.execute(sql.format(cond=cond), (orjson.dumps(list(datasources)),)))

    def newest_event_at(self, datasource: str) -> float | None:
        if not self._has("partition_stats"):
            return None
        row = self._con.execute(
            "SELECT MAX(newest_event_at) FROM partition_stats WHERE datasource=?", (datasource,)
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # --- writes (call inside write()) --------------------------------------------------

    def current_seq(self) -> int:
        return int(self._con.execute("SELECT v FROM meta WHERE k='seq'").fetchone()[0])

    def segments_after(self, datasource: str, seq: int) -> list[SegmentInfo]:
        """Live segments whose seq is greater than ``seq`` (what a key index lacks)."""
        return [
            _segment(r)
            for r in self._con.execute(
                "SELECT id, datasource, partition, path, rows, bytes, seq, created_at, packed "
                "FROM segments WHERE replaced_at IS NULL AND datasource=? AND seq > ? ORDER BY seq",
                (datasource, seq),
            )
        ]

    def next_seq(self) -> int:
        self._con.execute("UPDATE meta SET v = v + 1 WHERE k='seq'")
        return int(self._con.execute("SELECT v FROM meta WHERE k='seq'").fetchone()[0])

    def bump_generation(self) -> None:
        self._con.execute("UPDATE meta SET v = v + 1 WHERE k='generation'")

    def identity(self) -> int:
        """A random number drawn when this catalog was made: what a key-index snapshot
        names, so a snapshot is never applied to another catalog at the same seq."""
        return int(self._con.execute("SELECT v FROM meta WHERE k='identity'").fetchone()[0])

    def repairs(self) -> int:
        """How many repairs rewrote base rows; a writer's key index built under another
        count is stale (a repair may lower or remove a key's version), so it reloads."""
        row = self._con.execute("SELECT v FROM meta WHERE k='repairs'").fetchone()
        return 0 if row is None else int(row[0])

    def bump_repairs(self) -> None:
        self._con.execute(
            "INSERT INTO meta VALUES ('repairs', 1) ON CONFLICT (k) DO UPDATE SET v = v + 1"
        )

    def add_segments(
        self,
        segments: Iterable[NewSegment],
        *,
        seq: int | None = None,
        packed: bool = False,
        file_bytes: int | None = None,
    ) -> list[int]:
        """Add live segments; ``file_bytes`` is a pack's whole file (a segment's own
        ``bytes`` otherwise), what a check compares the file's size with."""
        seq = self.next_seq() if seq is None else seq
        now = time.time()
        ids = []
        for seg in segments:
            size = seg.bytes if file_bytes is None else file_bytes
            cur = self._con.execute(
                "INSERT INTO segments (datasource, partition, path, rows, bytes, seq, created_at,"
                " packed, digest, file_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seg.datasource,
                    seg.partition,
                    seg.path,
                    seg.rows,
                    seg.bytes,
                    seq,
                    now,
                    packed,
                    seg.digest,
                    size if seg.digest is not None else None,
                ),
            )
            ids.append(int(cur.lastrowid or 0))
        return ids

    def check_and_set_offsets(
        self, datasource: str, ranges: dict[tuple[str, int], tuple[int, int, str | None]]
    ) -> list[str]:
        """Return the mismatches (empty when the batch's start offsets are the stored
        ones); else store the ends, each with the log it is of (kept when not given)."""
        stored = self.offsets(datasource)
        problems = []
        for (topic, part), (start, _end, _log) in sorted(ranges.items()):
            have = stored.get((topic, part))
            if have is not None and have != start:
                problems.append(f"{topic}[{part}] starts at {start} but the catalog is at {have}")
        if problems:
            return problems
        now = time.time()
        self._con.executemany(
            "INSERT INTO offsets VALUES (?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (datasource, topic, partition) DO UPDATE"
            " SET next_offset = excluded.next_offset, updated_at = excluded.updated_at,"
            " log_id = COALESCE(excluded.log_id, log_id)",
            [(datasource, t, p, end, now, log) for (t, p), (_s, end, log) in ranges.items()],
        )
        return []

    def record_writes(
        self, datasource: str, per_partition: dict[str, tuple[int, float | None]]
    ) -> None:
        """Per partition: late rows added, newest event time (epoch s) written."""
        now = time.time()
        self._con.executemany(
            "INSERT INTO partition_stats (datasource, partition, late_rows, last_write_at,"
            " newest_event_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (datasource, partition) DO UPDATE"
            " SET late_rows = late_rows + excluded.late_rows,"
            " last_write_at = excluded.last_write_at,"
            " newest_event_at = MAX(COALESCE(newest_event_at, 0),"
            " COALESCE(excluded.newest_event_at, 0))",
            [(datasource, p, late, now, newest) for p, (late, newest) in per_partition.items()],
        )

    def replace_segments(
        self,
        datasource: str,
        partition: str,
        old_ids: Sequence[int],
        new: NewSegment | None,
        seq: int,
    ) -> int | None:
        """Atomically retire ``old_ids`` and add ``new``; raise if any was already retired."""
        now = time.time()
        placeholders = ",".join("?" * len(old_ids))
        cur = self._con.execute(
            f"UPDATE segments SET replaced_at = ? WHERE id IN ({placeholders})"  # noqa: S608
            " AND replaced_at IS NULL AND datasource = ? AND partition = ?",
            (now, *old_ids, datasource, partition),
        )
        if cur.rowcount != len(old_ids):
            raise _Conflict
        new_id = self.add_segments([new], seq=seq)[0] if new is not None else None
        self._con.execute(
            "INSERT INTO partition_stats (datasource, partition, late_rows, last_compacted_at)"
            " VALUES (?, ?, 0, ?) ON CONFLICT (datasource, partition) DO UPDATE"
            " SET late_rows = 0, last_compacted_at = excluded.last_compacted_at",
            (datasource, partition, now),
        )
        self.bump_generation()
        return new_id

    def add_dead_letters(self, letters: Iterable[DeadLetterRecord]) -> None:
        self._con.executemany(
            "INSERT OR IGNORE INTO dead_letters (id, datasource, sink, topic, partition,"
            ' "offset", key, value, reason, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
            [
                (
                    d.id,
                    d.datasource,
                    d.sink,
                    d.topic,
                    d.partition,
                    d.offset,
                    d.key,
                    d.value,
                    d.reason,
                    d.failed_at,
                )
                for d in letters
            ],
        )

    def dead_letter_counts(self, datasource: str) -> dict[str, tuple[int, int]]:
        """sink → (recorded, not yet published to the dead-letter topic)."""
        if not self._has("dead_letters"):
            return {}
        rows = self._con.execute(
            "SELECT sink, COUNT(*), SUM(published_at IS NULL) FROM dead_letters"
            " WHERE datasource = ? GROUP BY sink",
            (datasource,),
        )
        return {sink: (int(n), int(pending or 0)) for sink, n, pending in rows}

    def pending_dead_letters(self, datasource: str) -> list[DeadLetterRecord]:
        if not self._has("dead_letters"):
            return []
        rows = self._con.execute(
            'SELECT id, datasource, sink, topic, partition, "offset", key, value, reason,'
            " failed_at FROM dead_letters WHERE published_at IS NULL AND datasource = ?"
            ' ORDER BY topic, partition, "offset"',
            (datasource,),
        )
        return [DeadLetterRecord(*r) for r in rows]

    def mark_published(self, published: Iterable[tuple[str, int, int]]) -> None:
        now = time.time()
        self._con.executemany(
            "UPDATE dead_letters SET published_at = ?, dlq_partition = ?, dlq_offset = ?"
            " WHERE id = ?",
            [(now, part, off, ident) for ident, part, off in published],
        )

    def add_pack(
        self,
        datasource: str,
        old_ids: Sequence[int],
        path: str,
        rows: dict[str, int],
        size: int,
        digest: str | None = None,
    ) -> list[int]:
        """Atomically retire ``old_ids`` (one live segment per partition) and add one
        packed row per partition of ``rows`` pointing at ``path``; raise if any was
        already retired. Bytes are shared out by rows; the seq is the greatest replaced."""
        placeholders = ",".join("?" * len(old_ids))
        seq = self._con.execute(
            f"SELECT MAX(seq) FROM segments WHERE id IN ({placeholders})",  # noqa: S608
            tuple(old_ids),
        ).fetchone()[0]
        cur = self._con.execute(
            f"UPDATE segments SET replaced_at = ? WHERE id IN ({placeholders})"  # noqa: S608
            " AND replaced_at IS NULL AND datasource = ?",
            (time.time(), *old_ids, datasource),
        )
        if cur.rowcount != len(old_ids) or seq is None:
            raise _Conflict
        total = max(1, sum(rows.values()))
        ids = self.add_segments(
            [
                NewSegment(datasource, p, path, n, size * n // total, digest)
                for p, n in rows.items()
            ],
            seq=int(seq),
            packed=True,
            file_bytes=size,
        )
        self.bump_generation()
        return ids

    def expired_segments(self, older_than: float) -> list[tuple[int, str]]:
        return list(
            self._con.execute(
                "SELECT id, path FROM segments WHERE replaced_at IS NOT NULL AND replaced_at < ?",
                (older_than,),
            )
        )

    def forget_segments(self, ids: Sequence[int]) -> None:
        self._con.executemany("DELETE FROM segments WHERE id = ?", [(i,) for i in ids])

    def unreferenced(self, paths: Iterable[str]) -> list[str]:
        """Those of ``paths`` no segment row (live or awaiting GC) refers to."""
        return [
            p
            for p in dict.fromkeys(paths)
            if self._con.execute("SELECT 1 FROM segments WHERE path = ? LIMIT 1", (p,)).fetchone()
            is None
        ]

    # --- damage: files found missing or altered (``storage.embedded.integrity``) ------

    def file_records(self, datasource: str | None = None) -> list[FileRecord]:
        """Every live segment file once, with the partitions it holds."""
        files: dict[str, FileRecord] = {}
        for seg, digest, size in self._live_with_digests(datasource):
            have = files.get(seg.path)
            parts = (*have.partitions, seg.partition) if have else (seg.partition,)
            files[seg.path] = FileRecord(seg.path, seg.datasource, parts, size, digest)
        return list(files.values())

    def _live_with_digests(
        self, datasource: str | None
    ) -> list[tuple[SegmentInfo, str | None, int | None]]:
        if not self._has("segments"):
            return []
        sql = (
            "SELECT id, datasource, partition, path, rows, bytes, seq, created_at, packed,"
            " digest, file_bytes FROM segments WHERE replaced_at IS NULL"
        )
        args: tuple[str, ...] = ()
        if datasource is not None:
            sql += " AND datasource = ?"
            args = (datasource,)
        return [(_segment(r[:9]), r[9], r[10]) for r in self._con.execute(sql, args)]

    def damage(self) -> list[Damage]:
        """Live segments whose file is recorded as damaged (a repair replaces them)."""
        if not self._has("segments", "damage"):
            return []
        rows = self._con.execute(
            "SELECT s.datasource, s.partition, d.path, d.reason, d.found_at, d.found_by"
            " FROM damage d JOIN segments s ON s.path = d.path AND s.replaced_at IS NULL"
            " ORDER BY s.datasource, s.partition"
        )
        return [Damage(*r) for r in rows]

    def record_damage(self, found: Iterable[tuple[str, str]], found_by: str) -> int:
        """Record (path, reason) pairs not recorded yet; how many were new."""
        now = time.time()
        cur = self._con.executemany(
            "INSERT OR IGNORE INTO damage VALUES (?, ?, ?, ?)",
            [(path, reason, now, found_by) for path, reason in found],
        )
        return max(0, cur.rowcount)

    def forget_damage(self) -> None:
        """Drop records of files no live segment refers to any more (repaired)."""
        self._con.execute(
            "DELETE FROM damage WHERE path NOT IN"
            " (SELECT path FROM segments WHERE replaced_at IS NULL)"
        )

    def all_paths(self) -> set[str]:
        if not self._has("segments"):
            return set()
        return {r[0] for r in self._con.execute("SELECT path FROM segments")}


def _segment(row: Sequence[Any]) -> SegmentInfo:
    ident, datasource, partition, path, rows, size, seq, created_at, packed = row
    return SegmentInfo(
        ident, datasource, partition, path, rows, size, seq, created_at, bool(packed)
    )


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a catalog written by an older Tally to ``SCHEMA_VERSION`` (inside the
    caller's write transaction). v1 → v2: segment paths stop being unique (packs);
    v2 → v3: an offset records the log it is of and its last reset; v3 → v4: a
    segment records its file's digest and size (older ones have none: unchecked)."""
    row = con.execute(
        "SELECT v FROM meta WHERE k='schema_version'"
        if con.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
        else "SELECT NULL"
    ).fetchone()
    version = None if row is None else row[0]
    if version is None or version >= SCHEMA_VERSION:
        return
    if version == 1:
        con.execute("ALTER TABLE segments RENAME TO segments_v1")
        con.execute(_SEGMENTS)
        con.execute(
            "INSERT INTO segments (id, datasource, partition, path, rows, bytes, seq,"
            " created_at, replaced_at) SELECT id, datasource, partition, path, rows, bytes,"
            " seq, created_at, replaced_at FROM segments_v1"
        )
        con.execute("DROP TABLE segments_v1")  # its indexes go with it
    has_offsets = con.execute("SELECT 1 FROM sqlite_master WHERE name='offsets'").fetchone()
    if version <= 2 and has_offsets:  # (without one, the schema below creates it whole)
        con.execute("ALTER TABLE offsets ADD COLUMN log_id TEXT")
        con.execute("ALTER TABLE offsets ADD COLUMN reset TEXT")
    columns = {r[1] for r in con.execute("PRAGMA table_info(segments)")}
    if columns and "digest" not in columns:  # (a v1 catalog's table was just created whole)
        con.execute("ALTER TABLE segments ADD COLUMN digest TEXT")
        con.execute("ALTER TABLE segments ADD COLUMN file_bytes INTEGER")
    con.execute("UPDATE meta SET v = ? WHERE k='schema_version'", (SCHEMA_VERSION,))


class _Conflict(Exception):
    """Internal: a compaction's input segments were retired by someone else."""
