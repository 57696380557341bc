"""The writer's primary-key index: key → latest (version, event_id, partition, tenant, state).

Like a StarRocks primary-key table's index it lives in memory; unlike a separate
durable structure it is *derived*: segments are the only truth, so the index is
rebuilt from the live segments when a writer starts, and before every commit it
catches up with segments other writers committed since it last looked (under the
catalog write lock, so nothing can slip in between). A crash therefore never leaves
the index and the data disagreeing, and two ingest processes can share a datasource.

Commit-time work is a dict lookup per batch row: proportional to the batch, never
to the partition or the store.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb
from sqlglot import exp

from storage.embedded.sqlgen import DIALECT, Read, merged_base
from storage.sql import col, subquery
from tally.specs import DatasourceSpec

# (version, event_id, partition, tenant, state): a plain tuple, because building
# millions of NamedTuples costs more than the rest of a commit's Python work.
# ``state`` holds spec.rollup_state_columns (time as epoch micros), or None.
Entry = tuple[int, str, str, str, tuple[Any, ...] | None]


class KeyIndex:
    def __init__(self, spec: DatasourceSpec) -> None:
        self.spec = spec
        self.entries: dict[str, Entry] = {}
        self.seq = -1  # the catalog seq this index reflects
        self.repairs = 0  # the catalog's repair count it was loaded under
        self._intern: dict[str, str] = {}

    def intern(self, value: str) -> str:
        """Share the few distinct partition/tenant/dimension strings across entries."""
        got = self._intern.get(value)
        if got is None:
            got = self._intern[value] = sys.intern(value) if len(self._intern) < 1 << 20 else value
        return got

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, duck: duckdb.DuckDBPyConnection, segments: Sequence[Read], seq: int) -> None:
        """(Re)build from base segments: the latest live row per key among them."""
        self.entries.clear()
        self.apply_segments(duck, segments)
        self.seq = seq

    def apply_segments(self, duck: duckdb.DuckDBPyConnection, segments: Sequence[Read]) -> int:
        """Fold rows of ``segments`` in, keeping the greater (version, event_id) per key."""
        if not segments:
            return 0
        spec = self.spec
        ds = spec.datasource
        relation = merged_base(spec, [], list(segments))
        state_cols = spec.rollup_state_columns if spec.rollups else ()
        zone = exp.Literal.string(ds.timezone)
        local = exp.Anonymous(this="timezone", expressions=[zone, col(ds.time)])
        fmt = {"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}[ds.granularity]
        partition = exp.Anonymous(this="strftime", expressions=[local, exp.Literal.string(fmt)])
        projections = [
            col(ds.key),
            col(ds.version),
            col(ds.event_id),
            exp.alias_(partition, "p"),
            col(ds.tenant),
        ]
        for c in state_cols:
            if c == ds.time:
                projections.append(exp.Anonymous(this="epoch_us", expressions=[col(c)]))
            else:
                projections.append(col(c))
        query = exp.select(*projections).from_(subquery(relation, "m"))
        table = duck.sql(query.sql(dialect=DIALECT)).to_arrow_table()
        columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
        self.fold(
            zip(
                *columns[:5],
                zip(*columns[5:], strict=True) if state_cols else [None] * table.num_rows,
                strict=True,
            )
        )
        return int(table.num_rows)

    def fold(self, rows: Iterable[tuple[str, int, str, str, str, tuple[Any, ...] | None]]) -> None:
        entries = self.entries
        intern = self.intern
        for key, version, event_id, partition, tenant, state in rows:
            have = entries.get(key)
            if have is None or (version, event_id) > (have[0], have[1]):
                entries[key] = (version, event_id, intern(partition), intern(tenant), state)

    def put_many(self, updates: Iterable[tuple[str, Entry]]) -> None:
        self.entries.update(updates)
