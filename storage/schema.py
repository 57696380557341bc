"""Arrow schemas derived from a datasource spec: the rows every backend stores.

Engine-neutral: ingestion decodes into :func:`row_schema`, the generator builds it,
and each backend adds what it needs (the embedded engine a tombstone flag).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from tally.errors import InvalidRow
from tally.specs import DatasourceSpec, Rollup

BUCKET = "bucket"
ARROW_TYPES = {
    "string": pa.string(),
    "int": pa.int64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "bool": pa.bool_(),
}


def row_schema(spec: DatasourceSpec) -> pa.Schema:
    """The datasource's columns, in spec order."""
    return pa.schema([pa.field(name, ARROW_TYPES[col.type]) for name, col in spec.columns.items()])


def rollup_schema(spec: DatasourceSpec, rollup: Rollup) -> pa.Schema:
    """A rollup row: bucket start, dimension values, one signed int64 per metric."""
    fields = [pa.field(BUCKET, ARROW_TYPES["timestamp"])]
    fields += [pa.field(d, ARROW_TYPES[spec.columns[d].type]) for d in rollup.dimensions]
    fields += [pa.field(m.name, pa.int64()) for m in spec.parsed_metrics]
    return pa.schema(fields)


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows → Arrow in ``schema``. Naive datetimes are refused: Arrow would silently
    read them as UTC, and a wrong zone moves a payment into another day."""
    time_columns = [f.name for f in schema if pa.types.is_timestamp(f.type)]
    for row in rows:
        for name in time_columns:
            value = row.get(name)
            if isinstance(value, datetime) and value.utcoffset() is None:
                raise InvalidRow(f"column {name!r} must be timezone-aware, got {value.isoformat()}")
    try:
        return pa.Table.from_pylist(list(rows), schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        raise InvalidRow(f"row does not match the datasource schema: {exc}") from exc
