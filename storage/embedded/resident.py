"""Rollup partitions kept summed in memory, sorted by tenant — the embedded store's
answer to StarRocks' in-memory aggregate tables and Druid's memory-mapped segments.

A rollup partition is a handful of small delta files whose sum is its state. Reading
and summing them for every dashboard request costs milliseconds of file opening and
planning; the state itself, for one merchant and one quarter, is a few hundred rows.
So the reader keeps each partition it has been asked for as one Arrow table summed
per (bucket, dimensions) and sorted by tenant, with an index of each tenant's row
range: a request for one merchant slices its rows without scanning anyone else's.

Entries are keyed by the exact set of files they were built from, and files never
change, so an entry is valid for as long as its partition's file set is. When the set
only grew (new commits), the new files are read as a small *tail* that is summed with
the base at query time; tails are folded into the base once they grow. When files were
replaced (compaction), the entry is rebuilt. Memory is bounded by an LRU byte budget.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.schema import BUCKET
from tally.errors import StoreUnavailable
from tally.specs import DatasourceSpec, Rollup

TAIL_FOLD_ROWS = 50_000  # fold tails into the base beyond this many rows


def summed(table: pa.Table, keys: Sequence[str], metrics: Sequence[str]) -> pa.Table:
    """Deltas summed per ``keys``; the column order stays ``keys`` then ``metrics``."""
    if table.num_rows == 0:
        return table.select([*keys, *metrics])
    out = table.group_by(list(keys), use_threads=False).aggregate([(m, "sum") for m in metrics])
    return out.select([*keys, *(f"{m}_sum" for m in metrics)]).rename_columns([*keys, *metrics])


@dataclass
class _Entry:
    paths: frozenset[str]
    base: pa.Table  # summed, sorted by tenant then bucket
    tenants: dict[str, tuple[int, int]]  # tenant → (offset, length) in base
    tails: list[pa.Table] = field(default_factory=list)  # raw deltas of newer files
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.nbytes = self.base.nbytes

    def add_tail(self, tail: pa.Table, paths: frozenset[str]) -> None:
        self.tails.append(tail)
        self.paths = paths
        self.nbytes += tail.nbytes

    def rows_for(self, tenants: Sequence[str] | None) -> list[pa.Table]:
        if tenants is None:
            return [self.base, *self.tails]
        parts = [
            self.base.slice(*self.tenants[t]) for t in dict.fromkeys(tenants) if t in self.tenants
        ]
        if self.tails:
            wanted = pa.array(list(tenants), pa.string())
            column = self.base.schema.names[1]  # the tenant column follows the bucket
            parts += [t.filter(pc.is_in(t.column(column), value_set=wanted)) for t in self.tails]
        return parts


class ResidentRollups:
    """Thread-safe cache of summed rollup partitions under a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # full (re)builds, for tests and metrics
        self.tail_reads = 0

    def state(
        self,
        spec: DatasourceSpec,
        rollup: Rollup,
        partitions: dict[str, list[str]],
        tenants: Sequence[str] | None = None,
    ) -> pa.Table:
        """Summable deltas of ``partitions`` (partition → its live files), restricted to
        ``tenants``. Rows may repeat a (bucket, dimensions) group: callers sum."""
        parts: list[pa.Table] = []
        with self._lock:
            for partition, paths in sorted(partitions.items()):
                entry = self._entry(spec, rollup, partition, paths)
                parts += entry.rows_for(tenants)
            self._evict()
        schema = _schema(spec, rollup)
        parts = [p for p in parts if p.num_rows]
        if not parts:
            return schema.empty_table()
        return pa.concat_tables(parts)

    def _entry(
        self, spec: DatasourceSpec, rollup: Rollup, partition: str, paths: Sequence[str]
    ) -> _Entry:
        key = (rollup.name, partition)
        wanted = frozenset(paths)
        entry = self._entries.get(key)
        if entry is not None and entry.paths <= wanted:
            if entry.paths != wanted:
                self.tail_reads += 1
                entry.add_tail(_read(sorted(wanted - entry.paths), spec, rollup), wanted)
                if sum(t.num_rows for t in entry.tails) > TAIL_FOLD_ROWS:
                    entry = _build(spec, rollup, wanted, [entry.base, *entry.tails])
        else:
            self.loads += 1
            entry = _build(spec, rollup, wanted, [_read(sorted(wanted), spec, rollup)])
        self._entries[key] = entry
        self._entries.move_to_end(key)
        return entry

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        while total > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes


def _columns(spec: DatasourceSpec, rollup: Rollup) -> list[str]:
    # The tenant leads the dimensions so ``rows_for`` can find it by position.
    dims = [spec.datasource.tenant] + [d for d in rollup.dimensions if d != spec.datasource.tenant]
    return [BUCKET, *dims, *(m.name for m in spec.parsed_metrics)]


def _schema(spec: DatasourceSpec, rollup: Rollup) -> pa.Schema:
    names = _columns(spec, rollup)
    types = {BUCKET: pa.timestamp("us", tz="UTC")}
    metrics = {m.name for m in spec.parsed_metrics}
    return pa.schema(
        [(n, types.get(n, pa.int64() if n in metrics else pa.string())) for n in names]
    )


def _read(paths: Sequence[str], spec: DatasourceSpec, rollup: Rollup) -> pa.Table:
    """The files' rows in the cache's column order and types."""
    schema = _schema(spec, rollup)
    try:
        tables = [pq.read_table(p, columns=schema.names).cast(schema) for p in paths]
    except OSError as exc:
        raise StoreUnavailable(f"cannot read rollup segment: {exc}") from exc
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _build(
    spec: DatasourceSpec, rollup: Rollup, paths: frozenset[str], tables: list[pa.Table]
) -> _Entry:
    columns = _columns(spec, rollup)
    metrics = [m.name for m in spec.parsed_metrics]
    raw = pa.concat_tables(tables)
    base = summed(raw, columns[: -len(metrics)], metrics)
    nonzero = pc.not_equal(base.column(metrics[0]), 0)
    for m in metrics[1:]:
        nonzero = pc.or_(nonzero, pc.not_equal(base.column(m), 0))
    base = base.filter(nonzero)
    tenant = columns[1]
    base = base.sort_by([(tenant, "ascending"), (BUCKET, "ascending")]).combine_chunks()
    return _Entry(paths, base, _tenant_ranges(base.column(tenant)))


def _tenant_ranges(column: pa.ChunkedArray) -> dict[str, tuple[int, int]]:
    if len(column) == 0:
        return {}
    encoded = pc.run_end_encode(column.combine_chunks())
    ends = np.asarray(encoded.run_ends)
    starts = np.concatenate(([0], ends[:-1]))
    values = encoded.values.to_pylist()
    return {v: (int(s), int(e - s)) for v, s, e in zip(values, starts, ends, strict=True)}
