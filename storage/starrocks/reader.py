"""The StarRocks query side: SQL over the MySQL protocol, nothing merged on read.

The Primary Key table *is* the merged view (one row per key, the newest version by
``merge_condition``), so a datasource's relation is its table restricted to the
partitions of the range (``_pt``, which StarRocks prunes on); a rollup's is its
Aggregate table (already summed per group; the router sums again harmlessly).
Druid's LATEST_BY or a window per key is not needed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
from sqlglot import exp

from storage.protocol import IngestFigures, QueryResult
from storage.sql import col
from storage.starrocks import ddl
from storage.starrocks.capabilities import CAPABILITIES
from storage.starrocks.connection import Connection
from tally.errors import QueryError
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import bucket_key, floor


class StarRocksReader:
    capabilities = CAPABILITIES

    def __init__(
        self, settings: Settings, registry: SpecRegistry, *, sql: Connection | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sql = sql or Connection(settings.starrocks)

    def query(
        self, sql: str, params: Sequence[Any] | None = None, *, timeout_s: float | None = None
    ) -> QueryResult:
        names, rows = self.sql.execute(sql, params)
        return QueryResult(names, [list(r) for r in rows])

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        return self.sql.arrow(sql, params)

    def _table(self, name: str) -> exp.Table:
        table = ddl.table_of(self.settings, *self.registry.owner(name))
        return exp.table_(table, db=self.settings.starrocks.database, quoted=True)

    def _pt_range(
        self, spec: DatasourceSpec, granularity: str, start: datetime | None, end: datetime | None
    ) -> list[exp.Expression]:
        """``_pt`` bounds covering [start, end): partitions StarRocks can prune."""
        out: list[exp.Expression] = []
        if start is not None:
            first = floor(start, granularity, spec.tz)  # type: ignore[arg-type]
            out.append(
                exp.GTE(this=col(ddl.PT), expression=exp.Literal.string(ddl.wall(first, spec)))
            )
        if end is not None:
            out.append(exp.LT(this=col(ddl.PT), expression=exp.Literal.string(ddl.wall(end, spec))))
        return out

    def relation(
        self,
        name: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        tenants: Sequence[str] | None = None,
        skip_damaged: bool = False,  # (the engine keeps its own files: none is damaged)
    ) -> exp.Expression:
        spec, rollup = self.registry.owner(name)
        granularity = spec.datasource.granularity if rollup is None else rollup.partition
        conditions = self._pt_range(spec, granularity, start, end)
        if rollup is not None:  # an Aggregate table keeps a group netting to zero
            nonzero = [
                exp.NEQ(this=col(m.name), expression=exp.Literal.number(0))
                for m in spec.parsed_metrics
            ]
            conditions.append(exp.Paren(this=exp.or_(*nonzero)))
        if tenants is not None:
            conditions.append(col(spec.datasource.tenant).isin(*tenants))
        query = exp.select(exp.Star()).from_(self._table(name))
        return query.where(exp.and_(*conditions)) if conditions else query

    def partition_groups(
        self, name: str, start: datetime | None = None, end: datetime | None = None
    ) -> list[list[str]]:
        spec, rollup = self.registry.owner(name)
        if rollup is not None:
            raise QueryError(f"{name!r} is a rollup: partition groups are a datasource's")
        ds = spec.datasource
        query = exp.select(col(ddl.PT)).distinct().from_(self._table(name))
        conditions = self._pt_range(spec, ds.granularity, start, end)
        if conditions:
            query = query.where(exp.and_(*conditions))
        _names, rows = self.sql.execute(query.sql("starrocks"))
        keys = {bucket_key(_from_wall(r[0], spec), ds.granularity, spec.tz) for r in rows}
        return [[k] for k in sorted(keys)]

    def rollup_state(
        self,
        rollup: str,
        start: datetime | None = None,
        end: datetime | None = None,
        tenants: Sequence[str] | None = None,
    ) -> pa.Table:
        raise QueryError("the StarRocks backend keeps no resident rollup state")

    def lookup(
        self,
        datasource: str,
        keys: Sequence[str],
        *,
        tenant: str | None = None,
        partitions: Sequence[str] | None = None,
    ) -> pa.Table:
        spec, _ = self.registry.owner(datasource)
        ds = spec.datasource
        columns = [col(c) for c in spec.columns]
        query = exp.select(*columns).from_(self._table(datasource))
        unique = list(dict.fromkeys(keys)) or [""]
        conditions: list[exp.Expression] = [
            col(ds.key).isin(*(exp.Literal.string(k) for k in unique))
        ]
        if tenant is not None:
            conditions.append(col(ds.tenant).eq(exp.Literal.string(tenant)))
        if partitions is not None:
            walls = [
                exp.Literal.string(ddl.partition_pt(spec, ds.granularity, p)) for p in partitions
            ]
            conditions.append(col(ddl.PT).isin(*walls) if walls else exp.false())
        return self.sql.arrow(query.where(exp.and_(*conditions)).sql("starrocks"))

    def damaged(self) -> dict[str, dict[str, str]]:
        return {}  # the engine keeps its own files (capabilities.checks_files)

    def freshness(self, datasource: str) -> datetime | None:
        spec, _ = self.registry.owner(datasource)
        sql = exp.select(exp.Max(this=col(spec.datasource.time))).from_(self._table(datasource))
        _names, rows = self.sql.execute(sql.sql("starrocks"))
        value = rows[0][0] if rows else None
        return value if isinstance(value, datetime) else None

    def ingest_figures(self, datasource: str) -> IngestFigures:
        spec, _ = self.registry.owner(datasource)
        offsets = exp.select("topic", "partition", "committed").from_(
            exp.table_(ddl.OFFSETS, db=self.settings.starrocks.database, quoted=True)
        )
        offsets = offsets.where(exp.column("datasource").eq(exp.Literal.string(spec.name)))
        _n, rows = self.sql.execute(offsets.sql("starrocks"))
        count = exp.select(exp.Count(this=exp.Star())).from_(self._table(datasource))
        total = int(self.sql.execute(count.sql("starrocks"))[1][0][0])
        letters = exp.select(exp.Count(this=exp.Star())).from_(
            exp.table_(ddl.DEAD_LETTERS, db=self.settings.starrocks.database, quoted=True)
        )
        letters = letters.where(
            exp.and_(
                exp.column("datasource").eq(exp.Literal.string(spec.name)),
                exp.column("published").eq(exp.false()),
            )
        )
        unpublished = int(self.sql.execute(letters.sql("starrocks"))[1][0][0])
        return IngestFigures(
            offsets={(r[0], int(r[1])): int(r[2]) for r in rows},
            datasets={spec.name: (0, total, 0, 0)},
            dead_letters={"olap": (unpublished, unpublished)},
            newest_event_at=self.freshness(datasource),
        )

    def refresh(self) -> object:
        """Each statement reads StarRocks' newest visible version: nothing to bind;
        this checks that the FE answers (readiness)."""
        return self.sql.execute("SELECT 1")[1]

    def close(self) -> None:
        self.sql.close()


def _from_wall(value: datetime, spec: DatasourceSpec) -> datetime:
    """A ``_pt`` read back (marked UTC by the connection) as the instant it names."""
    return value.replace(tzinfo=spec.tz)
