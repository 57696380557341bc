"""The Druid backend's query side: Druid SQL on the broker, merged on read.

Every read of a base datasource goes through ``sqlgen.merged`` (latest
(version, event_id) per key with ``ROW_NUMBER()``, whatever Druid holds), limited to
the time range asked for, so Druid reads only the segments of those intervals. Druid
binds to its newest state on every query: ``refresh`` only checks the broker answers.

Measured (``python -m tests.storage.druid.measure_merge 20000`` and ``80000``; Druid
33 at nano sizes, 2 shared cores; docs/adr/0005-druid-merge-on-read.md): at 20,000
keys (25,769 rows) a raw count takes 45 ms, merged over the whole datasource 588 ms,
merged over one Seoul day 82 ms; at 80,000 keys (103,274 rows) 34 ms, 1,741 ms and
162 ms (about 20 µs a row on the broker). ``LATEST_BY`` per key was refused (a nested
GROUP BY short of merge buffers). So every read names its time range, and the API's
pages read the newest days first.

Each rollup is a Druid datasource of summed retraction deltas (ADR 0006): its
``relation`` is its rows, which the router sums. What Druid cannot do here is a
capability (``storage.druid.capabilities``): no resident rollup state.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from sqlglot import exp

from storage.druid import dialect
from storage.druid.broker import Broker
from storage.druid.capabilities import CAPABILITIES
from storage.druid.overlord import Overlord
from storage.druid.sqlgen import TIME, empty, empty_rollup, merged, rollup_rows, time_range
from storage.druid.supervisor import datasource_name, rollup_datasource_name
from storage.protocol import IngestFigures, QueryResult
from storage.sql import bucket_expr, col
from tally.errors import DruidUnavailable, QueryError
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import bucket_key, bucket_range


class DruidReader:
    """Stateless apart from which datasources Druid is known to serve: thread-safe."""

    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, registry: SpecRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.broker = Broker(
            settings.druid.broker_url,
            timeout_s=settings.druid.request_timeout_s,
            # Exact answers: Druid's COUNT(DISTINCT) is a sketch by default, and a
            # GROUP BY one column ORDER BY a metric LIMIT n an approximate TopN.
            context={
                "maxSubqueryRows": settings.druid.max_subquery_rows,
                "useApproximateCountDistinct": False,
                "useApproximateTopN": False,
            },
        )
        self._served: set[str] = set()  # Druid datasources seen served (they stay)

    # --- SQL ------------------------------------------------------------------------

    def query(
        self, sql: str, params: Sequence[Any] | None = None, *, timeout_s: float | None = None
    ) -> QueryResult:
        table = self.broker.arrow(sql, params, timeout_s=timeout_s)
        columns = [table[n] for n in table.column_names]
        rows = [list(r) for r in zip(*(c.to_pylist() for c in columns), strict=True)]
        return QueryResult(table.column_names, rows)

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        return self.broker.arrow(sql, params)

    # --- relations --------------------------------------------------------------------

    def _spec(self, name: str) -> DatasourceSpec:
        spec, rollup = self.registry.owner(name)
        if rollup is not None:
            raise QueryError(f"{name!r} is a rollup: only a datasource's rows can be merged")
        return spec

    def _druid_name(self, name: str) -> str:
        spec, rollup = self.registry.owner(name)
        if rollup is None:
            return datasource_name(self.settings, spec)
        return rollup_datasource_name(self.settings, rollup)

    def _served_name(self, spec: DatasourceSpec | str) -> str | None:
        """The Druid datasource of ``spec`` (or of a rollup, by name) if the broker
        serves it (None: not yet)."""
        name = (
            datasource_name(self.settings, spec)
            if isinstance(spec, DatasourceSpec)
            else self._druid_name(spec)
        )
        if name in self._served:
            return name
        _, _, rows = self.broker.sql(
            "SELECT COUNT(*) FROM INFORMATION_SCHEMA.TABLES"
            " WHERE TABLE_SCHEMA = 'druid' AND TABLE_NAME = ?",
            [name],
        )
        if rows and int(rows[0][0]) > 0:
            self._served.add(name)
            return name
        return None

    def relation(
        self,
        name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        tenants: Sequence[str] | None = None,
        skip_damaged: bool = False,  # (the engine keeps its own files: none is damaged)
    ) -> exp.Expression:
        """A datasource merged on read, or a rollup's summable rows, within
        [start, end); with ``tenants``, only their rows (for a datasource, the window
        partitions by tenant, so the condition commutes with it: Druid's planner does
        not push a filter from outside the window below it, and without this a
        merchant's query ranks every merchant's rows of the range)."""
        spec, rollup = self.registry.owner(name)
        served = self._served_name(name)
        if served is None:
            return empty(spec) if rollup is None else empty_rollup(spec, rollup)
        # Literals, not placeholders: the tree is embedded in callers' queries whose
        # own parameters are positional (sqlglot quotes the values).
        pushed = [] if tenants is None else [col(spec.datasource.tenant).isin(*tenants)]
        if rollup is not None:
            return rollup_rows(spec, rollup, served, start, end, pushed)
        return merged(spec, served, start, end, pushed)

    def partition_groups(
        self, name: str, start: datetime | None = None, end: datetime | None = None
    ) -> list[list[str]]:
        """The spec's partitions (calendar buckets in its zone) holding rows in
        [start, end), ascending, one per group: Druid reads any set of intervals in one
        query, so no two partitions cost one read."""
        spec = self._spec(name)
        served = self._served_name(spec)
        if served is None:
            return []
        ds = spec.datasource
        floor = bucket_expr(col(TIME), ds.granularity, ds.timezone)
        query = exp.select(exp.alias_(floor, "p")).from_(
            exp.Table(this=exp.to_identifier(served, quoted=True))
        )
        conditions = time_range(start, end)
        if conditions:
            query = query.where(exp.and_(*conditions))
        query = query.group_by(exp.Literal.number(1)).order_by(exp.Literal.number(1))
        table = self.broker.arrow(query.sql(dialect=dialect.NAME))
        keys = {bucket_key(t, ds.granularity, spec.tz) for t in table.column("p").to_pylist()}
        return [[k] for k in sorted(keys)]

    def rollup_state(
        self,
        rollup: str,
        start: datetime | None = None,
        end: datetime | None = None,
        tenants: Sequence[str] | None = None,
    ) -> pa.Table:
        raise QueryError(
            "the Druid backend keeps no resident rollup state (capabilities.resident_rollups)"
        )

    def lookup(
        self,
        datasource: str,
        keys: Sequence[str],
        *,
        tenant: str | None = None,
        partitions: Sequence[str] | None = None,
    ) -> pa.Table:
        """Merged rows for ``keys`` (and ``tenant``), both filters pushed below the
        window; ``partitions`` narrow the intervals read to the range they span."""
        spec = self._spec(datasource)
        ds = spec.datasource
        served = self._served_name(spec)
        if served is None or not keys or partitions == []:
            return self.broker.arrow(empty(spec).sql(dialect=dialect.NAME))
        start = end = None
        if partitions:
            bounds = [bucket_range(p, ds.granularity, spec.tz) for p in partitions]
            start, end = min(b[0] for b in bounds), max(b[1] for b in bounds)
        unique = list(dict.fromkeys(keys))
        pushed: list[exp.Expression] = [
            col(ds.key).isin(*(exp.Placeholder() for _ in unique)),
        ]
        params: list[Any] = list(unique)
        if tenant is not None:
            pushed.append(exp.EQ(this=col(ds.tenant), expression=exp.Placeholder()))
            params.append(tenant)
        sql = merged(spec, served, start, end, pushed).sql(dialect=dialect.NAME)
        return self.broker.arrow(sql, params)

    # --- figures ----------------------------------------------------------------------

    def damaged(self) -> dict[str, dict[str, str]]:
        return {}  # the engine keeps its own files (capabilities.checks_files)

    def freshness(self, datasource: str) -> datetime | None:
        """Newest event (partition) time Druid serves for ``datasource``: what its
        supervisor has ingested, whether published yet or still in a task's memory."""
        spec = self._spec(datasource)
        served = self._served_name(spec)
        if served is None:
            return None
        table = exp.Table(this=exp.to_identifier(served, quoted=True))
        sql = exp.select(exp.Max(this=col(TIME))).from_(table).sql(dialect=dialect.NAME)
        _, _, rows = self.broker.sql(sql)
        value = rows[0][0] if rows else None
        if value is None:
            return None
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)

    def ingest_figures(self, datasource: str) -> IngestFigures:
        """What Druid can say honestly: per refined-topic partition the offset its
        supervisor has read up to (its ``latestOffsets`` minus ``lag``: read, not
        necessarily published yet); active segments and their bytes
        (``sys.segments``), rows stored (every version: ``COUNT(*)``), late rows
        unknown (0); no
        dead letters pending (the relay publishes them in its transaction)."""
        spec = self._spec(datasource)
        name = datasource_name(self.settings, spec)
        _, _, rows = self.broker.sql(
            'SELECT COUNT(*), COALESCE(SUM("size"), 0) FROM sys.segments'
            " WHERE datasource = ? AND is_active = 1",
            [name],
        )
        segments, size = (int(v) for v in rows[0]) if rows else (0, 0)
        count = 0
        if self._served_name(spec) is not None:
            # sys.segments' num_rows lags (the broker refreshes segment metadata
            # periodically): the datasource's own COUNT(*) is exact and cheap.
            table = exp.Table(this=exp.to_identifier(name, quoted=True))
            sql = exp.select(exp.Count(this=exp.Star())).from_(table).sql(dialect=dialect.NAME)
            count = int(self.broker.sql(sql)[2][0][0])
        return IngestFigures(
            offsets=self.supervisor_offsets(name),
            datasets={spec.name: (segments, count, size, 0)},
            dead_letters={},
            newest_event_at=self.freshness(datasource),
        )

    def supervisor_offsets(self, supervisor: str) -> dict[tuple[str, int], int]:
        """(topic, partition) → the offset ``supervisor`` has read up to."""
        try:
            payload = Overlord(self.settings).status(supervisor)
        except DruidUnavailable:
            return {}  # figures are best effort: the broker answered, the overlord not
        if payload is None:
            return {}
        topic = str(payload.get("stream") or payload.get("topic") or "")
        latest = payload.get("latestOffsets") or {}
        lag = payload.get("lag") or {}
        return {(topic, int(p)): int(end) - int(lag.get(p, 0)) for p, end in latest.items()}

    def refresh(self) -> object:
        """Druid binds each query to its newest state, so there is nothing to bind;
        this checks that the broker answers SQL (readiness), DruidUnavailable if not."""
        return self.broker.sql("SELECT 1")[2]

    def close(self) -> None:
        return None
