"""Druid SQL over HTTP (``POST /druid/v2/sql``), stdlib ``urllib`` like the overlord.

Parameters go in the request's ``parameters`` list, typed, and Druid binds them to the
``?`` placeholders: values are never written into the SQL text (pydruid's DB-API
interpolates them client-side; this does not use it). Every query carries
``sqlTimeZone`` UTC (TIMESTAMP values are instants, read and written in UTC) and
Druid's own ``timeout`` (milliseconds), and the HTTP read waits no longer than that,
so a stuck broker (SIGSTOPped, or a network that drops packets) costs at most the
timeout, never a hang.

Failures are translated here, at the boundary: no ``broker_url``, connection refused,
an HTTP timeout, Druid's own query timeout and any 5xx are ``DruidUnavailable``
(transient, the API's 503); a query Druid refuses (4xx with ``errorMessage``:
unknown column, bad SQL, a parameter left unbound) is a ``QueryError`` carrying
Druid's message (the API's 400).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from tally.errors import DruidUnavailable, QueryError

SQL = "/druid/v2/sql"
_ARROW = {
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int64(),
    "SMALLINT": pa.int64(),
    "TINYINT": pa.int64(),
    "BOOLEAN": pa.bool_(),
    "DOUBLE": pa.float64(),
    "FLOAT": pa.float64(),
    "DECIMAL": pa.float64(),
    "VARCHAR": pa.string(),
    "CHAR": pa.string(),
}


def parameter(value: Any) -> dict[str, Any]:
    """One typed SQL parameter as Druid takes it."""
    if value is None:
        return {"type": "VARCHAR", "value": None}
    if isinstance(value, bool):
        return {"type": "BOOLEAN", "value": value}
    if isinstance(value, int):
        return {"type": "BIGINT", "value": value}
    if isinstance(value, float):
        return {"type": "DOUBLE", "value": value}
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise QueryError("a timestamp parameter must carry a time zone")
        millis = round(value.astimezone(UTC).timestamp() * 1000)
        return {"type": "TIMESTAMP", "value": millis}
    if isinstance(value, str):
        return {"type": "VARCHAR", "value": value}
    raise QueryError(f"cannot bind a parameter of type {type(value).__name__}")


class Broker:
    """One Druid broker's SQL endpoint."""

    def __init__(
        self, url: str | None, *, timeout_s: float, context: dict[str, Any] | None = None
    ) -> None:
        if not url:
            raise DruidUnavailable(
                "druid.broker_url is not set (TALLY_DRUID__BROKER_URL, e.g. http://127.0.0.1:8082)"
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.context = dict(context or {})

    def sql(
        self, query: str, params: Sequence[Any] | None = None, *, timeout_s: float | None = None
    ) -> tuple[list[str], list[str], list[list[Any]]]:
        """(column names, Druid SQL types, rows) of ``query``."""
        wait = self.timeout_s if timeout_s is None else timeout_s
        body = {
            "query": query,
            "resultFormat": "array",
            "header": True,
            "sqlTypesHeader": True,
            "parameters": [parameter(p) for p in params or ()],
            "context": self.context
            | {"sqlTimeZone": "Etc/UTC", "timeout": max(1, int(wait * 1000))},
        }
        request = urllib.request.Request(
            self.url + SQL,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=wait) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _refused(self.url, exc) from exc
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DruidUnavailable(f"Druid broker at {self.url} unreachable: {reason}") from exc
        try:
            rows = json.loads(raw)
        except ValueError as exc:
            raise DruidUnavailable(f"Druid broker at {self.url}: not JSON: {raw[:200]!r}") from exc
        if len(rows) < 2:
            raise DruidUnavailable(f"Druid broker at {self.url}: no header in {rows!r:.200}")
        return [str(c) for c in rows[0]], [str(t) for t in rows[1]], rows[2:]

    def arrow(
        self, query: str, params: Sequence[Any] | None = None, *, timeout_s: float | None = None
    ) -> pa.Table:
        names, types, rows = self.sql(query, params, timeout_s=timeout_s)
        return to_arrow(names, types, rows)


def to_arrow(names: Sequence[str], types: Sequence[str], rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Druid's JSON rows as Arrow, typed by the SQL types header (TIMESTAMP values
    arrive as ISO text in UTC)."""
    columns = []
    for i, sql_type in enumerate(types):
        values = [row[i] for row in rows]
        arrow_type = _ARROW.get(sql_type.split("(")[0].upper())
        if arrow_type is not None and pa.types.is_timestamp(arrow_type):
            values = [None if v is None else _instant(v) for v in values]
        columns.append(pa.array(values, type=arrow_type))
    return pa.Table.from_arrays(columns, names=list(names))


def _instant(value: Any) -> datetime:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _refused(url: str, exc: urllib.error.HTTPError) -> DruidUnavailable | QueryError:
    text = exc.read().decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    message = (
        (body.get("errorMessage") or body.get("error") or text) if isinstance(body, dict) else text
    )
    message = str(message).strip().splitlines()[0][:500] if str(message).strip() else str(exc)
    category = body.get("category") if isinstance(body, dict) else None
    # Druid answers its own query timeout with 504 (category TIMEOUT); capacity, a
    # service starting up or a segment not loaded yet with another 5xx. 501 is a
    # query its planner cannot plan (category UNSUPPORTED): the query's fault.
    if exc.code == 501:
        return QueryError(f"Druid cannot plan the query: {message}")
    if exc.code >= 500 or category in {"TIMEOUT", "CAPACITY_EXCEEDED", "RUNTIME_FAILURE"}:
        return DruidUnavailable(f"Druid broker at {url}: HTTP {exc.code}: {message}")
    return QueryError(f"Druid refused the query: {message}")
