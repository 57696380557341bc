"""``GET /v1/ledger``: payments and their settlements per bucket, tenant-scoped.

Each bucket and currency says what was sold (payments approved in the bucket: count,
gross, canceled, net), what was paid out (settlements paid out on a payout day in the
bucket: fees, VAT and the amount settled to the merchant) and what is still unsettled
at the bucket's end: the net of every payment approved by then, less what every
payout made by then covered (fee + VAT + settled). A payout later reversed (the
payment was canceled after it) no longer counts as paid, so its amount is unsettled
again until it is paid out anew.

Both sides are aggregates the rollup router answers (from each datasource's coarsest
exact rollup, or the base), combined here per bucket and currency rather than joined
in the engine: exact and cheap on every backend, Druid included, which joins two merged
datasources only by materialising one side (``Capabilities.sql_joins``). The response
names the source of each side.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from query_api.deps import (
    BucketSize,
    ForceBaseDep,
    FromQuery,
    MerchantOrAdminDep,
    ServicesDep,
    ToQuery,
)
from query_api.models import ErrorBody, LedgerBucket, LedgerResponse
from query_api.params import check_buckets, time_range
from rollups.request import AggregateRequest
from rollups.router import run
from storage import OlapReader
from tally.errors import NotFound
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import Granularity

router = APIRouter(tags=["ledger"])
PAYMENTS, SETTLEMENTS = "payments", "settlements"
PAID = "PAID_OUT"  # a settlement in this status has left the merchant's balance
# Lines of the ledger: (field, side, metric of that side's spec)
SOLD = (("count", "count"), ("gross", "gross_amount"), ("canceled", "canceled_amount"))
SOLD_NET = "net_amount"
PAID_OUT = (("fees", "fee"), ("vat", "vat"), ("settled", "settled_amount"))
_BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


@router.get(
    "/v1/ledger",
    response_model=LedgerResponse,
    responses={status: {"model": ErrorBody} for status in (400, 401, 403, 404, 422, 429)},
)
def ledger(
    services: ServicesDep,
    merchant: MerchantOrAdminDep,
    force_base: ForceBaseDep,
    from_: FromQuery,
    to: ToQuery,
    granularity: BucketSize = "day",
) -> LedgerResponse:
    """Sold, paid out and still unsettled, per bucket (calendar buckets in the
    payments' time zone) and currency."""
    payments, settlements = _sides(services.registry)
    time_range(from_, to)
    check_buckets(from_, to, granularity)
    reader = services.reader
    only_paid: dict[str, tuple[str, ...]] = {"status": (PAID,)}
    window = (from_, to, granularity)
    sold = _aggregate(reader, payments, merchant, window, force_base)
    paid = _aggregate(reader, settlements, merchant, window, force_base, only_paid)
    # The balance brought forward: everything before the range, by month (coarse: cheap).
    earlier: tuple[datetime, datetime, Granularity] = (_BEGINNING, from_, "month")
    balance: dict[str, int] = defaultdict(int)  # currency → unsettled so far
    for r in _aggregate(reader, payments, merchant, earlier, force_base).rows:
        balance[r["currency"]] += r[SOLD_NET]
    for r in _aggregate(reader, settlements, merchant, earlier, force_base, only_paid).rows:
        balance[r["currency"]] -= _covered(r)
    lines: dict[tuple[datetime, str], dict[str, int]] = defaultdict(_empty)
    for r in sold.rows:
        line = lines[(r["bucket"], r["currency"])]
        for field, metric in SOLD:
            line[field] += r[metric]
        line["net"] += r[SOLD_NET]
    for r in paid.rows:
        line = lines[(r["bucket"], r["currency"])]
        for field, metric in PAID_OUT:
            line[field] += r[metric]
    buckets = []
    for (bucket, currency), line in sorted(lines.items()):
        balance[currency] += line["net"] - line["fees"] - line["vat"] - line["settled"]
        buckets.append(
            LedgerBucket(bucket=bucket, currency=currency, unsettled=balance[currency], **line)
        )
    return LedgerResponse(
        buckets=buckets, sources={PAYMENTS: sold.source, SETTLEMENTS: paid.source}
    )


def _sides(registry: SpecRegistry) -> tuple[DatasourceSpec, DatasourceSpec]:
    names = registry.names()
    if PAYMENTS not in names or SETTLEMENTS not in names:
        raise NotFound("the ledger needs the payments and settlements datasources (TALLY_SPECS)")
    return registry.get(PAYMENTS), registry.get(SETTLEMENTS)


def _empty() -> dict[str, int]:
    return dict.fromkeys(("count", "gross", "canceled", "net", "fees", "vat", "settled"), 0)


def _covered(row: dict[str, Any]) -> int:
    return int(sum(row[metric] for _field, metric in PAID_OUT))


class _Result:
    def __init__(self, source: str, columns: list[str], rows: Iterable[list[Any]]) -> None:
        self.source = source
        self.rows = [dict(zip(columns, r, strict=True)) for r in rows]


def _aggregate(
    reader: OlapReader,
    spec: DatasourceSpec,
    merchant: str,
    window: tuple[datetime, datetime, Granularity],
    force_base: bool,
    only: dict[str, tuple[str, ...]] | None = None,
) -> _Result:
    """One side by bucket and currency, narrowed to the merchant (and ``only``)."""
    start, end, granularity = window
    filters = {spec.datasource.tenant: (merchant,), **(only or {})}
    if start >= end:
        return _Result("none", [], [])
    req = AggregateRequest(
        start=start, end=end, granularity=granularity, group_by=("currency",), filters=filters
    )
    routed, result = run(reader, spec, req, force_base=force_base)
    return _Result(routed.source, result.columns, result.rows)
