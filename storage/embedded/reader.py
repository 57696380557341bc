"""The embedded store's query side: DuckDB views over an atomic catalog snapshot.

Each query first checks the catalog generation (one indexed SQLite read). When it
moved, the views the query names are rebuilt from a consistent snapshot of the live
segment set in a single DuckDB transaction, and the query's cursor pins DuckDB's
catalog, so a query sees every view from one generation — never half a commit.
Views no query names are left until one does: a commit every 250 ms must not cost
every reader a rebuild of every view. Replaced files outlive their replacement by
the GC grace period, so a query already bound to old files finishes normally.

Views: ``<datasource>`` (merged: latest version per key, tombstones hidden),
``<rollup>`` (deltas summed per bucket and dimensions), and ``raw.<name>`` for every
datasource and rollup (segment rows as stored, with a ``filename`` column).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp

from storage.embedded.capabilities import CAPABILITIES
from storage.embedded.catalog import Catalog
from storage.embedded.integrity import examine
from storage.embedded.resident import ResidentRollups
from storage.embedded.segments import DELETED
from storage.embedded.sqlgen import (
    DIALECT,
    Read,
    base_columns,
    merged_base,
    merged_rollup,
    raw_relation,
    rollup_columns,
    scan,
    split_reads,
)
from storage.protocol import IngestFigures, QueryResult, SegmentInfo
from storage.schema import BUCKET
from storage.sql import col, subquery
from storage.sqlbounds import overlaps, read_range
from tally.errors import PartitionDamaged, QueryError, StoreUnavailable, TallyError
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry
from tally.timeutil import Granularity, bucket_range

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    generation: int = -1
    files: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # ds → part → paths
    packed: set[str] = field(default_factory=set)  # paths of packs (several partitions each)
    damaged: dict[str, dict[str, str]] = field(default_factory=dict)  # ds → part → why

    @classmethod
    def of(
        cls, generation: int, segments: Sequence[SegmentInfo], damaged: Mapping[str, str]
    ) -> Snapshot:
        """``damaged``: path → why (the catalog's records and this reader's finds)."""
        snap = cls(generation)
        for seg in segments:
            snap.files.setdefault(seg.datasource, {}).setdefault(seg.partition, []).append(seg.path)
            if seg.packed:
                snap.packed.add(seg.path)
            why = damaged.get(seg.path)
            if why is not None:
                snap.damaged.setdefault(seg.datasource, {})[seg.partition] = why
        return snap

    def healthy(self, datasource: str) -> dict[str, list[str]]:
        """Partition → files, without the damaged partitions (what views read)."""
        bad = self.damaged.get(datasource, {})
        return {p: fs for p, fs in self.files.get(datasource, {}).items() if p not in bad}

    def partition_of(self, path: str) -> tuple[str, list[str]] | None:
        """(datasource, partitions) holding ``path``."""
        for ds, parts in self.files.items():
            held = [p for p, fs in parts.items() if path in fs]
            if held:
                return ds, held
        return None


class EmbeddedReader:
    """Thread-safe reader; one per process is enough."""

    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, registry: SpecRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._con = duckdb.connect(
            config={
                "threads": settings.store.duckdb_threads,
                "memory_limit": settings.store.duckdb_memory_limit,
                "enable_external_access": True,
            }
        )
        # GLOBAL: queries run on cursors, which are connections of their own and
        # would not see a plain SET (without the metadata cache every query re-reads
        # every footer, ~0.1 ms a file).
        self._con.execute("SET GLOBAL parquet_metadata_cache = true")
        self._con.execute("SET GLOBAL TimeZone = 'UTC'")
        self._con.execute("CREATE SCHEMA IF NOT EXISTS raw")
        self.snapshot = Snapshot()
        self._found: dict[str, str] = {}  # path → why: files this reader failed to read
        # Every pack path seen: a path is a pack (or not) for its whole life, so this
        # only grows, and any thread may consult it without holding a snapshot.
        self._packs: set[str] = set()
        self._lookups: dict[tuple[Any, ...], str] = {}  # file set → lookup SQL
        self.resident = ResidentRollups(settings.store.resident_rollups_mb << 20)
        self._installed: dict[tuple[str, str], int] = {}  # view → generation it shows
        self._view_keys = [
            (schema, name)
            for spec in registry
            for name in (spec.name, *(r.name for r in spec.rollups))
            for schema in ("main", "raw")
        ]
        self._install(Snapshot(generation=-1))

    def close(self) -> None:
        with self._lock:
            self._con.close()
            if self._catalog is not None:
                self._catalog.close()

    # --- snapshot ---------------------------------------------------------------------

    def _catalog_or_none(self) -> Catalog | None:
        if self._catalog is None and self.settings.catalog_path.exists():
            self._catalog = Catalog(
                self.settings.catalog_path,
                busy_timeout_s=self.settings.store.busy_timeout_s,
                readonly=True,
            )
        return self._catalog

    def refresh(self) -> Snapshot:
        """Bind to the catalog's current generation (cheap when unchanged). Views are
        rebuilt lazily, when a query names them (``cursor``)."""
        with self._lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> Snapshot:
        catalog = self._catalog_or_none()
        if catalog is None:
            return self.snapshot
        try:
            with catalog.read():
                generation = catalog.generation()
                if generation == self.snapshot.generation:
                    return self.snapshot
                damage = {d.path: d.reason for d in catalog.damage()}
                snap = Snapshot.of(generation, catalog.live_segments(), self._found | damage)
        except Exception as exc:  # sqlite errors are translated inside Catalog
            raise StoreUnavailable(f"cannot read catalog: {exc}") from exc
        self._packs |= snap.packed
        self.snapshot = snap
        return snap

    def _body(self, snap: Snapshot, schema: str, name: str) -> exp.Expression:
        spec, rollup = self._owner(name)
        if rollup is None:
            parts = snap.healthy(name)
            if schema == "raw":
                clean, dirty = self._reads(spec, parts)
                if not parts:
                    return _raw([*base_columns(spec), (DELETED, "bool")], [])
                return scan([*clean, *dirty], spec.datasource.time, filename=True)
            return self._merged(spec, parts)
        paths = [p for files in snap.healthy(name).values() for p in files]
        if schema == "raw":
            return _raw(rollup_columns(spec, rollup), paths)
        return merged_rollup(spec, rollup, paths)

    def _install(self, snap: Snapshot, sql: str | None = None) -> None:
        """Make the views ``sql`` may name (all when None) match ``snap``, in one DuckDB
        transaction. A view counts as named when its name occurs in the text as a whole
        word, in any case (identifiers are case-insensitive): a superset of the views
        the query reads, so none it reads is left behind; the rest wait."""
        stale = [
            key
            for key in self._view_keys
            if self._installed.get(key) != snap.generation
            and (sql is None or _names(key[1]).search(sql))
        ]
        if not stale:
            return
        statements = [_view(name, self._body(snap, schema, name), schema) for schema, name in stale]
        con = self._con
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                con.execute(statement)
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        for key in stale:
            self._installed[key] = snap.generation

    # --- queries --------------------------------------------------------------------

    def cursor(self, sql: str | None = None) -> duckdb.DuckDBPyConnection:
        """A cursor whose views match one generation: those ``sql`` names, or all.

        The cursor opens a transaction and touches the catalog before the lock is
        released, which pins DuckDB's catalog snapshot: another thread reinstalling
        some views for a newer generation cannot give this query a mix of two."""
        with self._lock:
            snap = self._refresh_locked()
            if sql is not None and snap.damaged:
                self._refuse_damaged(snap, sql)
            self._install(snap, sql)
            cur = self._con.cursor()
            cur.execute("BEGIN TRANSACTION")
            cur.execute("SELECT 1 FROM duckdb_views() LIMIT 0").fetchall()
            return cur

    def _refuse_damaged(self, snap: Snapshot, sql: str) -> None:
        """Raise if ``sql`` reads the time range of a damaged partition (or cannot be
        shown not to): views leave damaged partitions out, so what passes here loses
        nothing it asked for."""
        for name, parts in snap.damaged.items():
            if not _names(name).search(sql):
                continue
            spec, rollup = self._owner(name)
            granularity = rollup.partition if rollup else spec.datasource.granularity
            column = BUCKET if rollup else spec.datasource.time
            try:
                span = read_range(sql, name, column, DIALECT)
            except sqlglot.errors.SqlglotError:
                span = (None, None)
            if span is None:
                continue
            hit = sorted(p for p in parts if overlaps(span, *_bounds(p, granularity, spec.tz)))
            if hit:
                raise _damaged_error(name, hit, parts)

    def damaged(self) -> dict[str, dict[str, str]]:
        """The catalog's damage records, and what a size check of every live file finds
        (one ``stat`` a file: readiness probes call this): a file lost while no writer
        looked is reported here, and left out of every view, at once."""
        self._check_sizes()
        return {name: dict(parts) for name, parts in self.refresh().damaged.items()}

    def _check_sizes(self) -> None:
        catalog = self._catalog_or_none()
        if catalog is None:
            return
        with self._lock, catalog.read():
            records = catalog.file_records()
        found = {r.path: why for r in records if (why := examine(r, full=False)) is not None}
        if set(found) - set(self._found):
            with self._lock:
                self._found |= found
                self.snapshot = Snapshot()  # views are rebuilt without them
                self._installed.clear()

    def _failed(self, exc: duckdb.Error, what: str) -> TallyError:
        """A failed read, classified: a live segment file named in the engine's error
        is damaged (marked, so views leave it out from now on: 503 naming the
        partition); a fault of the engine is the server's (503); anything else is the
        query's (400). No path leaves here: the details go to the server's log."""
        text = str(exc)
        snap = self.snapshot
        for path in {p for parts in snap.files.values() for fs in parts.values() for p in fs}:
            if path in text:
                held = snap.partition_of(path)
                log.error("reading %s failed: %s", path, _one_line(exc))
                new = path not in self._found
                with self._lock:
                    self._found[path] = "file unreadable"
                    self.snapshot = Snapshot()  # views are rebuilt without it
                    self._installed.clear()
                if held is not None:
                    name, parts = held
                    error = _damaged_error(name, parts, dict.fromkeys(parts, "file unreadable"))
                    return _Found(error.message) if new else error
        if isinstance(exc, _ENGINE_FAULTS):
            log.error("%s failed in the engine: %s", what, _one_line(exc))
            return StoreUnavailable("the store failed to read its data (see the server log)")
        return QueryError(_scrub(_one_line(exc), str(self.settings.data_dir)))

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        try:
            return self._arrow(sql, params)
        except _Found:  # views are rebuilt without it: a query not reading it passes now
            return self._arrow(sql, params)

    def _arrow(self, sql: str, params: Sequence[Any] | None) -> pa.Table:
        cur = self.cursor(sql)
        try:
            return cur.sql(sql, params=list(params) if params else None).to_arrow_table()
        except duckdb.Error as exc:
            raise self._failed(exc, "a query") from exc
        finally:
            cur.close()

    def query(
        self, sql: str, params: Sequence[Any] | None = None, *, timeout_s: float | None = None
    ) -> QueryResult:
        """Run ``sql``; with ``timeout_s`` the engine is interrupted after that long."""
        try:
            return self._query(sql, params, timeout_s)
        except _Found:  # views are rebuilt without it: a query not reading it passes now
            return self._query(sql, params, timeout_s)

    def _query(
        self, sql: str, params: Sequence[Any] | None, timeout_s: float | None
    ) -> QueryResult:
        cur = self.cursor(sql)
        timer = None if timeout_s is None else threading.Timer(timeout_s, cur.interrupt)
        if timer is not None:
            timer.start()
        try:
            result = cur.execute(sql, params or [])
            columns = [d[0] for d in result.description or []]
            return QueryResult(columns, [list(r) for r in result.fetchall()])
        except duckdb.InterruptException as exc:
            raise QueryError(f"query cancelled after {timeout_s:g} s") from exc
        except duckdb.Error as exc:
            raise self._failed(exc, "a query") from exc
        finally:
            if timer is not None:
                timer.cancel()
            cur.close()

    def freshness(self, datasource: str) -> datetime | None:
        """Newest committed event time of a datasource (its freshness watermark)."""
        catalog = self._catalog_or_none()
        if catalog is None:
            return None
        with self._lock, catalog.read():
            newest = catalog.newest_event_at(datasource)
        return None if newest is None else datetime.fromtimestamp(newest, UTC)

    def ingest_figures(self, datasource: str) -> IngestFigures:
        spec = self.registry.get(datasource)
        names = [spec.name, *(r.name for r in spec.rollups)]
        catalog = self._catalog_or_none()
        if catalog is None:
            return IngestFigures({}, {}, {}, None)
        with self._lock, catalog.read():
            offsets = catalog.offsets(datasource)
            stats = catalog.stats_rows(names)
            letters = catalog.dead_letter_counts(datasource)
            newest = catalog.newest_event_at(datasource)
        datasets: dict[str, list[int]] = {}
        for name, _part, segments, rows, size, late, *_ in stats:
            sums = datasets.setdefault(str(name), [0, 0, 0, 0])
            for i, value in enumerate((segments, rows, size, late)):
                sums[i] += int(value)  # type: ignore[call-overload]
        return IngestFigures(
            offsets,
            {k: (v[0], v[1], v[2], v[3]) for k, v in datasets.items()},
            letters,
            None if newest is None else datetime.fromtimestamp(newest, UTC),
        )

    def relation(
        self,
        name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        tenants: Sequence[str] | None = None,
        skip_damaged: bool = False,
    ) -> exp.Expression:
        """Rows of a datasource (merged) or a rollup (raw deltas), reading only the
        partitions that overlap [start, end) — Druid's interval pruning. Each base
        partition is self-consistent (tombstones live where the key was), so any
        subset of partitions deduplicates correctly on its own. ``tenants`` is not
        used: DuckDB pushes the caller's tenant filter into the Parquet scan itself."""
        spec, rollup, chosen = self._chosen(name, start, end, skip_damaged=skip_damaged)
        if rollup is not None:
            return raw_relation(
                rollup_columns(spec, rollup), [p for ps in chosen.values() for p in ps]
            )
        return self._merged(spec, chosen)

    def partition_groups(
        self, name: str, start: datetime | None = None, end: datetime | None = None
    ) -> list[list[str]]:
        """Live partitions of ``name`` overlapping [start, end), ascending; neighbours
        read from the same pack share a group."""
        chosen = self._chosen(name, start, end, skip_damaged=None)[2]
        groups: list[list[str]] = []
        last: list[str] | None = None
        for part in sorted(chosen):
            files = chosen[part]
            if groups and last == files and files[0] in self._packs:
                groups[-1].append(part)
            else:
                groups.append([part])
            last = files
        return groups

    def rollup_state(
        self,
        rollup: str,
        start: datetime | None = None,
        end: datetime | None = None,
        tenants: Sequence[str] | None = None,
    ) -> pa.Table:
        spec, owned, chosen = self._chosen(rollup, start, end)
        if owned is None:
            raise QueryError(f"{rollup!r} is not a rollup")
        return self.resident.state(spec, owned, chosen, tenants)

    def _chosen(
        self,
        name: str,
        start: datetime | None,
        end: datetime | None,
        *,
        skip_damaged: bool | None = False,
    ) -> tuple[DatasourceSpec, Rollup | None, dict[str, list[str]]]:
        """(spec, rollup or None, partition → live files) for the partitions of
        ``name`` overlapping [start, end) in the current snapshot. A damaged one among
        them raises PartitionDamaged, or is left out (``skip_damaged``), or is listed
        like the others (None: for callers that only list partitions)."""
        snap = self.refresh()
        spec, rollup = self._owner(name)
        granularity = rollup.partition if rollup else spec.datasource.granularity
        chosen = {
            part: paths
            for part, paths in snap.files.get(name, {}).items()
            if _overlaps(part, granularity, spec.tz, start, end)
        }
        bad = snap.damaged.get(name, {})
        hit = sorted(p for p in chosen if p in bad)
        if hit and skip_damaged is False:
            raise _damaged_error(name, hit, bad)
        if hit and skip_damaged:
            chosen = {p: fs for p, fs in chosen.items() if p not in bad}
        return spec, rollup, chosen

    def _owner(self, name: str) -> tuple[DatasourceSpec, Rollup | None]:
        return self.registry.owner(name)

    def _reads(
        self, spec: DatasourceSpec, parts: Mapping[str, list[str]]
    ) -> tuple[list[Read], list[Read]]:
        ds = spec.datasource
        return split_reads(parts, self._packs, lambda p: _bounds(p, ds.granularity, spec.tz))

    def _merged(self, spec: DatasourceSpec, parts: Mapping[str, list[str]]) -> exp.Expression:
        """The merged view over ``parts`` (partition → files): a partition in one
        segment is read as is, the others are deduplicated."""
        return merged_base(spec, *self._reads(spec, parts))

    def lookup(
        self,
        datasource: str,
        keys: Sequence[str],
        *,
        tenant: str | None = None,
        partitions: Sequence[str] | None = None,
    ) -> pa.Table:
        """Merged rows for ``keys``. ``partitions`` (e.g. from the search index, which
        stores each document's partition time) limits the files read; ``tenant`` adds
        the tenant predicate, which also prunes row groups (segments sort by tenant)."""
        spec = self.registry.get(datasource)
        snap = self.refresh()
        files = snap.files.get(datasource, {})
        chosen = files if partitions is None else {p: files[p] for p in partitions if p in files}
        bad = snap.damaged.get(datasource, {})
        if any(p in bad for p in chosen):
            raise _damaged_error(datasource, sorted(p for p in chosen if p in bad), bad)
        # The SQL depends only on the files read: built once per file set, with the keys
        # and the tenant as parameters (a dashboard's lookups repeat the same few).
        files_key = tuple(sorted((p, tuple(ps)) for p, ps in chosen.items()))
        shape = (datasource, files_key, tenant is not None)  # the tenant is a parameter
        sql = self._lookups.get(shape)
        if sql is None:
            ds = spec.datasource
            conditions: list[exp.Expression] = [
                exp.Anonymous(this="list_contains", expressions=[exp.Placeholder(), col(ds.key)])
            ]
            if tenant is not None:
                conditions.append(exp.EQ(this=col(ds.tenant), expression=exp.Placeholder()))
            relation = subquery(self._merged(spec, chosen), "m")
            sql = exp.select(exp.Star()).from_(relation).where(*conditions).sql(dialect=DIALECT)
            with self._lock:
                if len(self._lookups) >= 512:
                    self._lookups.pop(next(iter(self._lookups)))
                self._lookups[shape] = sql
        params: list[Any] = [list(keys)] if tenant is None else [list(keys), tenant]
        return self.arrow(sql, params)


@lru_cache(maxsize=256)
def _names(name: str) -> re.Pattern[str]:
    # Not inside a path ("…/segments/payments/…"): inline file reads name no view.
    return re.compile(rf"(?<![\w$/]){re.escape(name)}(?![\w$/])", re.IGNORECASE)


@lru_cache(maxsize=1 << 16)
def _bounds(partition: str, granularity: Granularity, tz: ZoneInfo) -> tuple[datetime, datetime]:
    return bucket_range(partition, granularity, tz)


def _overlaps(
    partition: str,
    granularity: Granularity,
    tz: ZoneInfo,
    start: datetime | None,
    end: datetime | None,
) -> bool:
    lo, hi = _bounds(partition, granularity, tz)
    return (end is None or lo < end) and (start is None or hi > start)


def _q(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql(dialect=DIALECT)


def _view(name: str, body: exp.Expression, schema: str = "main") -> str:
    target = exp.Table(this=exp.to_identifier(name, quoted=True), db=exp.to_identifier(schema))
    return f"CREATE OR REPLACE VIEW {target.sql(dialect=DIALECT)} AS {body.sql(dialect=DIALECT)}"


def _raw(columns: Sequence[tuple[str, str]], paths: Sequence[str]) -> exp.Expression:
    from storage.embedded.sqlgen import empty_relation, read_parquet

    if not paths:
        rel = empty_relation(columns)
        return rel.select(exp.alias_(exp.cast(exp.Null(), "VARCHAR"), "filename"))
    call = read_parquet(paths)
    assert isinstance(call, exp.Anonymous)
    call.append("expressions", exp.EQ(this=exp.column("filename"), expression=exp.true()))
    return exp.select(exp.Star()).from_(exp.Table(this=call))


# The engine's own faults (the server's, not the query's): 5xx over HTTP.
_ENGINE_FAULTS = (
    duckdb.IOException,
    duckdb.InternalException,
    duckdb.OutOfMemoryException,
    duckdb.FatalException,
)


class _Found(PartitionDamaged):
    """Internal: a damaged file this reader just found (the query is tried once more)."""


def _damaged_error(name: str, hit: Sequence[str], why: Mapping[str, str]) -> PartitionDamaged:
    shown = ", ".join(f"{p} ({why.get(p, 'damaged')})" for p in hit[:5])
    more = f" and {len(hit) - 5} more" if len(hit) > 5 else ""
    return PartitionDamaged(
        f"{name}: stored partition(s) {shown}{more} cannot be read; what reads them fails"
        " until they are rebuilt from the log (tally verify --repair)"
    )


def _scrub(text: str, path: str) -> str:
    """``text`` without ``path`` nor any other absolute path (a client never sees where
    the server keeps its files)."""
    return _PATHS.sub("<file>", text.replace(path, "<file>"))


_PATHS = re.compile(r"(?<![\w:])/(?:[\w.@+-]+/)+[\w.@+-]*")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
