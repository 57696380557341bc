"""How a sink's state differs from what the log implies: pure functions over plain
values, so the rules are tested without a broker, a store or an index.

Kinds, the same for every sink:

* ``missing`` — the log has the key (or rollup group), the sink does not;
* ``stale`` — the sink holds an older (version, event_id) than the log's latest;
* ``unexpected`` — the sink holds a key, a group, or a version the log does not;
* ``corrupt`` — same version, different values (a row's fields, a group's metrics,
  a document's event_id or partition time);
* ``duplicate`` — the OLAP merged view shows a key more than once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from tally.specs import DatasourceSpec
from tally.timeutil import utc_datetimes

Row = tuple[Any, ...]  # a base row, columns in spec order
Group = tuple[Any, ...]  # (bucket, *dimensions) of a rollup


@dataclass(frozen=True)
class Difference:
    sink: str  # olap | rollup | search
    kind: str
    key: str | None = None
    rollup: str | None = None
    group: tuple[tuple[str, Any], ...] | None = None  # (column, value) pairs
    expected: Mapping[str, Any] | None = None
    found: Mapping[str, Any] | None = None

    @property
    def ident(self) -> tuple[Any, ...]:
        """What the difference is about (values aside): the same after a re-read means
        it persisted."""
        return (self.sink, self.kind, self.key, self.rollup, self.group)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sink": self.sink, "kind": self.kind}
        if self.key is not None:
            out["key"] = self.key
        if self.rollup is not None:
            out["rollup"] = self.rollup
        if self.group is not None:
            out["group"] = dict(self.group)
        out["expected"] = None if self.expected is None else dict(self.expected)
        out["found"] = None if self.found is None else dict(self.found)
        return out


def table_rows(table: pa.Table, columns: Sequence[str]) -> list[Row]:
    """Rows of ``columns`` as tuples; timestamps as aware UTC datetimes."""
    values = []
    for name in columns:
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            values.append(utc_datetimes(column))
        else:
            values.append(column.to_pylist())
    return list(zip(*values, strict=True))


def compare_rows(
    spec: DatasourceSpec, expected: Mapping[str, Row], found: Iterable[Row]
) -> list[Difference]:
    """The OLAP merged view (``found``) against the latest row per key."""
    ds = spec.datasource
    names = list(spec.columns)
    k, v, e = names.index(ds.key), names.index(ds.version), names.index(ds.event_id)
    by_key: dict[str, list[Row]] = {}
    for row in found:
        by_key.setdefault(row[k], []).append(row)
    diffs: list[Difference] = []

    def ident(row: Row) -> dict[str, Any]:
        return {ds.version: row[v], ds.event_id: row[e]}

    for key, want in expected.items():
        if key not in by_key:
            diffs.append(Difference("olap", "missing", key, expected=ident(want)))
    for key, rows in by_key.items():
        if len(rows) > 1:
            diffs.append(Difference("olap", "duplicate", key, found={"rows": len(rows)}))
        got = max(rows, key=lambda r: (r[v], r[e]))
        if key not in expected:
            diffs.append(Difference("olap", "unexpected", key, found=ident(got)))
            continue
        want = expected[key]
        if (got[v], got[e]) != (want[v], want[e]):
            kind = "stale" if (got[v], got[e]) < (want[v], want[e]) else "unexpected"
            diffs.append(Difference("olap", kind, key, expected=ident(want), found=ident(got)))
        elif got != want:
            cols = [i for i, name in enumerate(names) if got[i] != want[i]]
            diffs.append(
                Difference(
                    "olap",
                    "corrupt",
                    key,
                    expected={names[i]: want[i] for i in cols},
                    found={names[i]: got[i] for i in cols},
                )
            )
    return diffs


def compare_groups(
    rollup: str,
    columns: Sequence[str],
    metrics: Sequence[str],
    expected: Mapping[Group, tuple[int, ...]],
    found: Mapping[Group, tuple[int, ...]],
) -> list[Difference]:
    """A rollup's stored groups against the groups recomputed from the log. Both
    sides hold only groups with a non-zero metric (what the rollup views show)."""
    diffs: list[Difference] = []
    for group in expected.keys() | found.keys():
        want, got = expected.get(group), found.get(group)
        if want == got:
            continue
        kind = "missing" if got is None else "unexpected" if want is None else "corrupt"
        diffs.append(
            Difference(
                "rollup",
                kind,
                rollup=rollup,
                group=tuple(zip(columns, group, strict=True)),
                expected=None if want is None else dict(zip(metrics, want, strict=True)),
                found=None if got is None else dict(zip(metrics, got, strict=True)),
            )
        )
    return diffs


def compare_search(
    expected: Mapping[str, tuple[int, str, datetime]],
    found: Mapping[str, tuple[int, str]],
    located: Mapping[str, datetime],
    *,
    event_ids: bool,
) -> list[Difference]:
    """Indexed (version, event_id) per key, and partition time where ``located`` has
    it, against the latest event per key. ``event_ids=False`` for backends where an
    exact version tie legitimately keeps the first event written (Elasticsearch)."""
    diffs: list[Difference] = []

    def ident(version: int, event_id: str) -> dict[str, Any]:
        return {"version": version, "event_id": event_id}

    for key, (version, event_id, at) in expected.items():
        got = found.get(key)
        if got is None:
            diffs.append(Difference("search", "missing", key, expected=ident(version, event_id)))
            continue
        want = (version, event_id) if event_ids else (version, got[1])
        if got != want:
            kind = "stale" if got < want else "unexpected" if got[0] > version else "corrupt"
            diffs.append(Difference("search", kind, key, expected=ident(*want), found=ident(*got)))
        elif key in located and located[key] != at:
            diffs.append(
                Difference(
                    "search", "corrupt", key, expected={"time": at}, found={"time": located[key]}
                )
            )
    for key in found.keys() - expected.keys():
        diffs.append(Difference("search", "unexpected", key, found=ident(*found[key])))
    return diffs
