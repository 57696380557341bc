"""``GET /v1/transactions`` and ``/v1/transactions/{txn_id}``, tenant-scoped.

Search proposes, OLAP disposes (DESIGN §3): with ``q`` the search index returns
candidate ids for the merchant and time range; the store applies every filter and
supplies every field, so a status changed after indexing shows as it is now.

Pagination is keyset, never offset: the cursor carries the last row's sort key
(``approved_at``, which never changes, then ``txn_id``; for relevance the score),
so rows arriving meanwhile neither shift nor repeat a page.
"""

# No `from __future__ import annotations`: the routes are built in a closure whose
# parameter annotations FastAPI must evaluate with the closure's variables.

import base64
import binascii
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import pyarrow as pa
from fastapi import APIRouter, Path, Query
from sqlglot import exp

from query_api.deps import MerchantDep, ServicesDep
from query_api.models import (
    ErrorBody,
    Freshness,
    IndexCoverage,
    details_model,
    transaction_model,
    transactions_model,
)
from query_api.params import time_range
from query_api.services import Services
from search import Hit, SearchOrder
from search.analysis import MIN_GRAM, indexed
from storage.sql import col, subquery, timestamp
from tally.errors import InvalidArgument, NotFound
from tally.specs import DatasourceSpec
from tally.timeutil import bucket_key, bucket_range, from_micros, to_micros, utc_datetimes

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody},
    404: {"model": ErrorBody},
    422: {"model": ErrorBody},
    429: {"model": ErrorBody},
}


class _Cursor(msgspec.Struct, array_like=True):
    sort: str
    fingerprint: str
    time_us: int
    key: str
    score: float = 0.0


def build(spec: DatasourceSpec, related: Sequence[DatasourceSpec] = ()) -> APIRouter:
    """The routes of ``spec``; the details of one entity carry the entity of each
    ``related`` datasource with the same key (a payment's settlement)."""
    router = APIRouter(tags=["transactions"])
    item_model = transaction_model(spec)
    page_model = transactions_model(item_model)
    details = details_model(item_model, related)
    ds = spec.datasource
    statuses = tuple(spec.columns["status"].values or ()) if "status" in spec.columns else ()
    methods = tuple(spec.columns["method"].values or ()) if "method" in spec.columns else ()

    @router.get("/v1/transactions", response_model=page_model, responses=_ERRORS)
    def list_transactions(
        services: ServicesDep,
        merchant: MerchantDep,
        from_: Annotated[datetime | None, Query(alias="from")] = None,
        to: datetime | None = None,
        status: Annotated[str | None, Query(description=f"one of {', '.join(statuses)}")] = None,
        method: Annotated[str | None, Query(description=f"one of {', '.join(methods)}")] = None,
        q: Annotated[str | None, Query(max_length=200, description="keywords")] = None,
        limit: Annotated[int, Query(ge=1)] = 50,
        cursor: str | None = None,
        sort: Literal["time", "relevance"] = "time",
    ) -> Any:
        """The merchant's transactions, newest first (or by relevance with ``q``)."""
        time_range(from_, to)
        if status is not None and statuses and status not in statuses:
            raise InvalidArgument(f"status must be one of {', '.join(statuses)}")
        if method is not None and methods and method not in methods:
            raise InvalidArgument(f"method must be one of {', '.join(methods)}")
        text = (q or "").strip()
        if sort == "relevance" and not indexed(text):
            raise InvalidArgument(
                f"sort=relevance needs q of {MIN_GRAM} or more characters (or one Korean letter)"
            )
        limit = min(limit, services.settings.api.page_max)
        filters = {"status": status, "method": method}
        fingerprint = _fingerprint(merchant, from_, to, filters, q, sort)
        after = _decode(cursor, sort, fingerprint) if cursor else None
        if indexed(text):
            rows = _hybrid(services, merchant, text, from_, to, filters, sort, after, limit + 1)
        else:
            # No keyword, or one ASCII character (which nearly every row contains):
            # the store scans the merchant's rows newest first.
            contains = text.lower() or None
            rows = _scan(services, merchant, from_, to, filters, after, limit + 1, contains)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = None
        if more:
            last = rows[-1]
            next_cursor = _encode(
                _Cursor(
                    sort,
                    fingerprint,
                    to_micros(last[ds.time]),
                    last[ds.key],
                    float(last.pop("_score", 0.0)),
                )
            )
        for row in rows:
            row.pop("_score", None)
        indexed_part = spec.selection("search")
        coverage = None
        if indexed(text) and not indexed_part.everything:
            coverage = IndexCoverage(sample=indexed_part.sample, filter=indexed_part.filter)
        return {
            "items": rows,
            "next_cursor": next_cursor,
            "freshness": _freshness(services),
            "search_coverage": coverage,
        }

    @router.get("/v1/transactions/{txn_id}", response_model=details, responses=_ERRORS)
    def get_transaction(
        services: ServicesDep,
        merchant: MerchantDep,
        txn_id: Annotated[str, Path(max_length=200)],
    ) -> Any:
        """One transaction; 404 for an unknown id and for another merchant's alike."""
        # The index knows the partition; a key it has not seen yet (or ever) is
        # looked up across all partitions, so its lag only costs time.
        at = services.search.locate([txn_id]).get(txn_id)
        parts = None if at is None else [bucket_key(at, ds.granularity, spec.tz)]
        rows = _rows(services.reader.lookup(spec.name, [txn_id], tenant=merchant, partitions=parts))
        if not rows and parts is not None:
            rows = _rows(services.reader.lookup(spec.name, [txn_id], tenant=merchant))
        if not rows:
            raise NotFound(f"no transaction {txn_id!r}")
        found = rows[0]
        for other in related:
            assert other.relation is not None
            mine = _rows(services.reader.lookup(other.name, [txn_id], tenant=merchant))
            found[other.relation.as_] = mine[0] if mine else None
        return found

    return router


def _freshness(services: Services) -> Freshness:
    return Freshness(
        olap=services.reader.freshness(services.spec.name), search=services.search.freshness()
    )


def _conditions(
    spec: DatasourceSpec,
    merchant: str,
    start: datetime | None,
    end: datetime | None,
    filters: dict[str, str | None],
) -> list[exp.Expression]:
    ds = spec.datasource
    out: list[exp.Expression] = [
        exp.EQ(this=col(ds.tenant), expression=exp.Literal.string(merchant))
    ]
    if start is not None:
        out.append(exp.GTE(this=col(ds.time), expression=timestamp(start)))
    if end is not None:
        out.append(exp.LT(this=col(ds.time), expression=timestamp(end)))
    for name, value in filters.items():
        if value is not None:
            out.append(exp.EQ(this=col(name), expression=exp.Literal.string(value)))
    return out


def _scan(
    services: Services,
    merchant: str,
    start: datetime | None,
    end: datetime | None,
    filters: dict[str, str | None],
    after: _Cursor | None,
    n: int,
    contains: str | None = None,
) -> list[dict[str, Any]]:
    """Newest first (only rows with ``contains`` in a searchable field, if given),
    reading partitions newest first in growing windows (1, 2, 4 ... reads: a day, or a
    pack of cold days that costs one) and stopping once the page is full: a
    dashboard's first page reads today, not the merchant's whole history."""
    spec = services.spec
    ds = spec.datasource
    reader = services.reader
    conditions: list[exp.Expression] = _conditions(spec, merchant, start, end, filters)
    if after is not None:
        at = datetime.fromtimestamp(after.time_us / 1e6, UTC)
        newest = at + timedelta(microseconds=1)
        end = newest if end is None else min(end, newest)
        t = timestamp(at)
        conditions.append(
            exp.Paren(
                this=exp.Or(
                    this=exp.LT(this=col(ds.time), expression=t),
                    expression=exp.And(
                        this=exp.EQ(this=col(ds.time), expression=t.copy()),
                        expression=exp.LT(
                            this=col(ds.key), expression=exp.Literal.string(after.key)
                        ),
                    ),
                )
            )
        )
    if contains:
        conditions.append(
            exp.Paren(
                this=exp.or_(
                    *(
                        exp.GT(
                            this=exp.StrPosition(
                                this=exp.Lower(this=col(f)), substr=exp.Literal.string(contains)
                            ),
                            expression=exp.Literal.number(0),
                        )
                        for f in ds.searchable
                    )
                )
            )
        )
    groups = reader.partition_groups(spec.name, start, end)
    rows: list[dict[str, Any]] = []
    width = 1
    while groups and len(rows) < n:
        chunk = [p for group in groups[-width:] for p in group]
        groups = groups[:-width]
        width *= 2
        lo = bucket_range(chunk[0], ds.granularity, spec.tz)[0]
        hi = bucket_range(chunk[-1], ds.granularity, spec.tz)[1]
        query = (
            exp.select(exp.Star())
            .from_(subquery(reader.relation(spec.name, lo, hi), "m"))
            .where(exp.and_(*conditions))
            .order_by(
                exp.Ordered(this=col(ds.time), desc=True), exp.Ordered(this=col(ds.key), desc=True)
            )
            .limit(n - len(rows))
        )
        rows += _rows(reader.arrow(query.sql(dialect=reader.capabilities.sql_dialect)))
    return rows


def _hybrid(
    services: Services,
    merchant: str,
    q: str,
    start: datetime | None,
    end: datetime | None,
    filters: dict[str, str | None],
    sort: str,
    after: _Cursor | None,
    n: int,
) -> list[dict[str, Any]]:
    """Candidates from the index in the page's order (newest first, or best first),
    checked against the store in growing chunks until the page is full.

    The index returns its top ``limit``; every match ranked strictly above the last
    one is among them, so those are checked in order and the page is cut there. When
    they do not fill the page (filters rejected many), the index is asked again for
    four times as many: a broad keyword costs about a page's worth of work, a
    selective filter more, and nothing is ever skipped."""
    order: SearchOrder = "score" if sort == "relevance" else "time"
    index_end = end
    if order == "time" and after is not None:
        newest = from_micros(after.time_us + 1)  # the cursor's own microsecond, re-read
        index_end = newest if end is None else min(end, newest)
    needle = q.strip().lower()
    checked: set[str] = set()
    rows: list[dict[str, Any]] = []
    limit = max(2 * n, 50)
    while True:
        hits = services.search.search(merchant, q, start, index_end, limit=limit, order=order)
        exhausted = len(hits) < limit
        if not exhausted:
            # Hits tied with the last one may have been cut anywhere: not complete.
            last = _rank(hits[-1], order)
            hits = [h for h in hits if _rank(h, order) != last]
        if after is not None:
            hits = [h for h in hits if _beyond(h, after, order)]
        hits = [h for h in hits if h.key not in checked]
        chunk = n + 10
        while hits and len(rows) < n:
            cut = min(chunk, len(hits))
            while cut < len(hits) and _rank(hits[cut], order) == _rank(hits[cut - 1], order):
                cut += 1  # keep ties together: the page order breaks them by key
            part, hits = hits[:cut], hits[cut:]
            chunk *= 2
            checked.update(h.key for h in part)
            rows += _verified(services, merchant, part, start, end, filters, needle)
        if len(rows) >= n or exhausted:
            return rows[:n]
        limit *= 4


def _rank(hit: Hit, order: SearchOrder) -> float | datetime:
    return hit.time if order == "time" else hit.score


def _beyond(hit: Hit, after: _Cursor, order: SearchOrder) -> bool:
    """Whether ``hit`` comes after the cursor in the page's order."""
    if order == "time":
        return (to_micros(hit.time), hit.key) < (after.time_us, after.key)
    return (-hit.score, hit.key) > (-after.score, after.key)


def _verified(
    services: Services,
    merchant: str,
    hits: list[Hit],
    start: datetime | None,
    end: datetime | None,
    filters: dict[str, str | None],
    needle: str,
) -> list[dict[str, Any]]:
    """The store's rows for ``hits`` that pass every filter, in the hits' order: the
    index proposes, the store decides (status may have changed since indexing)."""
    spec = services.spec
    ds = spec.datasource
    partitions = sorted({bucket_key(h.time, ds.granularity, spec.tz) for h in hits})
    found = {
        row[ds.key]: row
        for row in _rows(
            services.reader.lookup(
                spec.name, [h.key for h in hits], tenant=merchant, partitions=partitions
            )
        )
    }
    out: list[dict[str, Any]] = []
    for hit in hits:
        row = found.get(hit.key)
        if row is None:
            continue  # not in the store yet (the index can run ahead)
        at = row[ds.time]
        if (start is not None and at < start) or (end is not None and at >= end):
            continue
        if any(v is not None and row[k] != v for k, v in filters.items()):
            continue
        if needle and not any(needle in (row[f] or "").lower() for f in ds.searchable):
            continue  # the index proposes by grams; the text itself decides
        row["_score"] = hit.score
        out.append(row)
    return out


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts, internal columns dropped (times converted the fast way)."""
    names = [n for n in table.column_names if not n.startswith("_")]
    columns = [
        utc_datetimes(table[n])
        if pa.types.is_timestamp(table[n].type) and not table[n].null_count
        else table[n].to_pylist()
        for n in names
    ]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def _fingerprint(merchant: str, *parts: Any) -> str:
    """Ties a cursor to the request it came from: reusing it with other filters (or
    another merchant's key) is an error, not a silently wrong page."""
    text = msgspec.json.encode([merchant, [str(p) for p in parts]])
    return hashlib.sha256(text).hexdigest()[:16]


def _encode(cursor: _Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(cursor)).decode().rstrip("=")


def _decode(text: str, sort: str, fingerprint: str) -> _Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cursor = msgspec.msgpack.decode(raw, type=_Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidArgument("cursor is not one this API issued") from exc
    if cursor.sort != sort or cursor.fingerprint != fingerprint:
        raise InvalidArgument("cursor belongs to another query; start without it")
    return cursor
