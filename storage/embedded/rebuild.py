"""Recompute the embedded engine's rollups from the merged base and repair any difference.

The repair is itself a delta: for each group, ``expected − stored`` is written as
one more rollup segment in a single catalog transaction, so a repair is atomic,
cheap, and leaves the normal retraction machinery untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from sqlglot import exp

from storage.calendar import partitions_of
from storage.embedded.catalog import NewSegment
from storage.embedded.core import StoreCore, partition_bounds, unlink_all
from storage.embedded.gcpause import gc_paused
from storage.embedded.segments import PendingSegment, rollup_sort_keys
from storage.embedded.sqlgen import DIALECT, Read, merged_base, raw_relation, rollup_columns
from storage.protocol import RebuildReport, SegmentInfo
from storage.schema import rollup_schema
from storage.sql import bucket_expr, col, subquery, timestamp
from tally.specs import DatasourceSpec, Rollup


def repair_query(
    spec: DatasourceSpec,
    rollup: Rollup,
    base_clean: Sequence[Read],
    base_dirty: Sequence[Read],
    rollup_paths: Sequence[str],
    start: datetime | None,
    end: datetime | None,
) -> str:
    """Rows of ``expected − stored`` for every group where they differ."""
    dims = list(rollup.dimensions)
    metrics = spec.parsed_metrics
    tcol = spec.datasource.time

    def in_range(column: str) -> exp.Condition:
        conds: list[exp.Expression] = [exp.true()]
        if start is not None:
            conds.append(exp.GTE(this=col(column), expression=timestamp(start)))
        if end is not None:
            conds.append(exp.LT(this=col(column), expression=timestamp(end)))
        return exp.and_(*conds)

    bucket = bucket_expr(col(tcol), rollup.granularity, spec.datasource.timezone)
    expected = (
        exp.select(
            exp.alias_(bucket, "bucket"),
            *(col(d) for d in dims),
            *(exp.alias_(m.aggregate_sql(), m.name) for m in metrics),
        )
        .from_(subquery(merged_base(spec, base_clean, base_dirty), "b"))
        .where(in_range(tcol))
        .group_by(*(exp.Literal.number(i + 1) for i in range(1 + len(dims))))
    )
    stored_keys = [col("bucket"), *(col(d) for d in dims)]
    stored = (
        exp.select(*stored_keys, *(exp.alias_(exp.Sum(this=col(m.name)), m.name) for m in metrics))
        .from_(subquery(raw_relation(rollup_columns(spec, rollup), rollup_paths), "r"))
        .where(in_range("bucket"))
        .group_by(*stored_keys)
    )
    on = exp.and_(
        *(
            exp.NullSafeEQ(this=exp.column(k, "e"), expression=exp.column(k, "s"))
            for k in ["bucket", *dims]
        )
    )

    def delta(name: str) -> exp.Expression:
        zero = exp.Literal.number(0)
        return exp.Sub(
            this=exp.Coalesce(this=exp.column(name, "e"), expressions=[zero]),
            expression=exp.Coalesce(this=exp.column(name, "s"), expressions=[zero.copy()]),
        )

    projections = [
        exp.alias_(exp.Coalesce(this=exp.column(k, "e"), expressions=[exp.column(k, "s")]), k)
        for k in ["bucket", *dims]
    ] + [exp.alias_(exp.cast(delta(m.name), "BIGINT"), m.name) for m in metrics]
    differs = exp.or_(
        *(exp.NEQ(this=delta(m.name), expression=exp.Literal.number(0)) for m in metrics)
    )
    query = (
        exp.select(*projections)
        .from_(expected.subquery("e"))
        .join(stored.subquery("s"), on=on, join_type="FULL OUTER")
        .where(differs)
        .order_by(exp.Literal.number(1))
    )
    return query.sql(dialect=DIALECT)


def healthy_base(
    core: StoreCore, spec: DatasourceSpec, damaged: set[str]
) -> tuple[list[Read], list[Read]]:
    """(clean, dirty) reads of the base's live segments (a partition in one segment
    is clean: read as is), leaving out damaged files (restore them first: ``restore``).
    Call inside a catalog transaction."""
    parts: dict[str, list[SegmentInfo]] = {}
    for seg in core.catalog.live_segments(spec.name):
        if seg.path not in damaged:
            parts.setdefault(seg.partition, []).append(seg)
    clean = [r for p in parts.values() if len(p) == 1 for r in core.reads(spec, p)]
    dirty = [r for p in parts.values() if len(p) > 1 for r in core.reads(spec, p)]
    return clean, dirty


def rebuild_rollups(
    core: StoreCore, datasource: str, partition: str | None = None, rollup_name: str | None = None
) -> list[RebuildReport]:
    """Recompute rollups from the merged base; write ``expected − stored`` deltas.

    Holds the catalog write lock throughout, so the comparison sees one state and
    no commit can interleave; ingestion waits (and retries) meanwhile.
    """
    spec = core.registry.get(datasource)
    rollups = [spec.rollup(rollup_name)] if rollup_name else list(spec.rollups)
    start = end = None
    if partition is not None:
        start, end = partition_bounds(partition, spec.datasource.granularity, spec)
    reports: list[RebuildReport] = []
    written: list[Path] = []
    try:
        with gc_paused(), core.catalog.write():
            damaged = {d.path for d in core.catalog.damage()}
            clean, dirty = healthy_base(core, spec, damaged)
            new_segments: list[NewSegment] = []
            for rollup in rollups:
                paths = [
                    s.path for s in core.catalog.live_segments(rollup.name) if s.path not in damaged
                ]
                query = repair_query(spec, rollup, clean, dirty, paths, start, end)
                table = core.duck.sql(query).to_arrow_table()
                report = RebuildReport(rollup.name, partition, table.num_rows)
                report.differences = _jsonable(table.slice(0, 20).to_pylist())
                reports.append(report)
                if not table.num_rows:
                    continue
                schema = rollup_schema(spec, rollup)
                table = table.select(schema.names).cast(schema)
                keys = partitions_of(
                    table.column("bucket"), rollup.partition, spec.datasource.timezone
                )
                sort = rollup_sort_keys(spec, rollup)
                pending = [
                    PendingSegment(rollup.name, part, table.filter(pc.equal(keys, part)), sort)
                    for part in sorted(set(keys.to_pylist()))
                ]
                new_segments.extend(core.write(pending, written))
            if new_segments:
                core.catalog.add_segments(new_segments)
                core.catalog.bump_generation()
    except BaseException:
        unlink_all(written)
        raise
    return reports


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()} for r in rows
    ]
