"""Parquet segment files of the embedded engine: tombstones, sort order, durable writes.

A base segment holds full rows (plus ``_deleted`` for tombstones) sorted by tenant,
partition time and key so that per-tenant and time-range scans prune row groups by
their min/max statistics. A rollup segment holds signed deltas per bucket and
dimension values, sorted the same way.
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from storage.schema import BUCKET, row_schema, rows_to_table
from tally.errors import StoreError, StoreFull, StoreUnavailable
from tally.specs import DatasourceSpec, Rollup

DELETED = "_deleted"  # tombstone flag: a key that moved partition or tenant
_ROW_GROUP_ROWS = 8 * 1024  # small enough for per-tenant pruning of a day


def base_schema(spec: DatasourceSpec) -> pa.Schema:
    """A base segment's schema: the datasource's rows plus the tombstone flag."""
    return pa.schema([*row_schema(spec), pa.field(DELETED, pa.bool_())])


def base_sort_keys(spec: DatasourceSpec) -> list[tuple[str, str]]:
    ds = spec.datasource
    return [(ds.tenant, "ascending"), (ds.time, "ascending"), (ds.key, "ascending")]


def rollup_sort_keys(spec: DatasourceSpec, rollup: Rollup) -> list[tuple[str, str]]:
    tenant = spec.datasource.tenant
    rest = [d for d in rollup.dimensions if d != tenant]
    return [(tenant, "ascending"), (BUCKET, "ascending"), *((d, "ascending") for d in rest)]


def to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows → Arrow in ``schema``; a missing tombstone flag means a live row."""
    table = rows_to_table(rows, schema)
    if DELETED in schema.names:
        index = schema.get_field_index(DELETED)
        table = table.set_column(index, DELETED, table[DELETED].fill_null(False))
    return table


class Written(NamedTuple):
    """A segment file made durable: where, how many bytes, and their digest (what a
    later check compares the file with: ``file_digest``)."""

    path: Path
    size: int
    digest: str


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of the whole file, read in 1 MiB blocks (hashlib releases the GIL
    on large updates). A whole-file digest, because DuckDB does not check Parquet's
    optional page CRCs when it reads: a flipped bit would be read as data."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PendingSegment:
    datasource: str
    partition: str
    table: pa.Table
    sort_keys: list[tuple[str, str]] | None  # None: already sorted


class SegmentWriter:
    """Writes segment files under ``root/<datasource>/<partition>/<uuid>.parquet``.

    Durability before visibility: every file and its directory are fsynced before
    the catalog transaction that references them commits. Files are written first
    and fsynced together from a thread pool, because a late batch touches dozens of
    partitions and serial fsyncs would dominate its cost.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="segment-io")

    def path_for(self, datasource: str, partition: str) -> Path:
        return self.root / datasource / partition / f"{uuid.uuid4().hex}.parquet"

    def write(
        self, table: pa.Table, datasource: str, partition: str, sort_keys: list[tuple[str, str]]
    ) -> Written:
        """Write one segment durably."""
        written: list[Path] = []
        (done,) = self.write_many(
            [PendingSegment(datasource, partition, table, sort_keys)], written
        )
        return done

    def write_many(self, pending: list[PendingSegment], written: list[Path]) -> list[Written]:
        """Write all durably; append paths to ``written`` as they are created so a
        caller can remove them if its transaction fails."""
        return self.begin_many(pending, written).wait()

    def begin_many(self, pending: list[PendingSegment], written: list[Path]) -> SegmentWrites:
        """Start writing (encode, then fsync files and directories) in the pool and
        return at once, so the caller can do CPU work while the disk is busy."""
        paths: list[Path] = []
        dirs: set[Path] = set()
        for seg in pending:
            path = self.path_for(seg.datasource, seg.partition)
            dirs.add(path.parent)
            paths.append(path)
        try:
            # A directory created now must itself survive power loss: fsync the
            # parents of every directory this call creates, up to the root.
            for folder in sorted(dirs):
                created = _mkdirs(folder)
                dirs.update(p.parent for p in created)
        except OSError as exc:
            raise write_error(exc) from exc
        written.extend(paths)
        # pyarrow releases the GIL while encoding; two writers keep both cores busy.
        files = [
            self._pool.submit(_write_durably, seg, path)
            for seg, path in zip(pending, paths, strict=True)
        ]
        return SegmentWrites(self._pool, paths, files, sorted(dirs))


class SegmentWrites:
    """Segment files being written; ``wait`` returns once all are durable."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        paths: list[Path],
        files: list[Future[tuple[int, str]]],
        dirs: list[Path],
    ) -> None:
        self._pool, self._paths, self._files, self._dirs = pool, paths, files, dirs

    def wait(self) -> list[Written]:
        wait_all(self._files)  # even if one failed: no write may outlive the caller's cleanup
        try:
            done = [f.result() for f in self._files]
            list(self._pool.map(_fsync, self._dirs))
        except OSError as exc:
            raise write_error(exc) from exc
        return [
            Written(p, size, digest) for p, (size, digest) in zip(self._paths, done, strict=True)
        ]


def _mkdirs(folder: Path) -> list[Path]:
    """mkdir -p, returning the directories it had to create (outermost first)."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _write_durably(seg: PendingSegment, path: Path) -> tuple[int, str]:
    table = seg.table if seg.sort_keys is None else seg.table.sort_by(seg.sort_keys)
    pq.write_table(
        table,
        path,
        compression="lz4",
        compression_level=1,
        row_group_size=_ROW_GROUP_ROWS,
        write_statistics=True,
    )
    _fsync(path)
    return path.stat().st_size, file_digest(path)  # read back from the page cache


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(exc: OSError) -> StoreError:
    """A failed segment write, classified: a full disk is terminal (retrying cannot
    help until an operator frees space), anything else may pass (transient)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(
            f"cannot write segments, the disk is full: {exc}; free space, then restart"
        )
    return StoreUnavailable(f"cannot write segments: {exc}")
