"""How commands report: a table for people, one JSON document with ``--format json``."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

import orjson


class Format(StrEnum):
    table = "table"
    json = "json"


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(document: Any) -> str:
    return orjson.dumps(document, default=_default).decode()


def emit_json(document: Any) -> None:
    sys.stdout.write(dumps(document) + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def emit_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    sys.stdout.write("\n".join(out) + "\n")


def emit_record(record: Mapping[str, Any], fmt: Format) -> None:
    """One record: a one-row table for people, the object itself with ``--format json``."""
    if fmt is Format.json:
        emit_json(record)
    else:
        emit_table(list(record), [list(record.values())])
