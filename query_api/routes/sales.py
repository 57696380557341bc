"""``GET /v1/sales``: aggregates answered by the rollup router, tenant-scoped."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from query_api.deps import (
    BucketSize,
    ForceBaseDep,
    FromQuery,
    MerchantOrAdminDep,
    ServicesDep,
    ToQuery,
)
from query_api.models import ErrorBody, SalesBucket, SalesResponse
from query_api.params import check_buckets, time_range
from rollups.request import AggregateRequest
from rollups.router import run
from tally.errors import InvalidArgument

router = APIRouter(tags=["sales"])


@router.get(
    "/v1/sales",
    response_model=SalesResponse,
    responses={status: {"model": ErrorBody} for status in (400, 401, 403, 422, 429)},
)
def sales(
    services: ServicesDep,
    merchant: MerchantOrAdminDep,
    force_base: ForceBaseDep,
    from_: FromQuery,
    to: ToQuery,
    granularity: BucketSize = "day",
    group_by: Annotated[str, Query(description="comma-separated: method, status, currency")] = "",
) -> SalesResponse:
    """Count, gross, canceled and net amount per bucket (calendar buckets in the
    datasource's time zone), from the coarsest rollup that answers exactly.

    ``force_base`` scans the base rows, which costs far more than a rollup; it is
    operator tooling (comparisons, benchmarks), so only admin keys may ask for it."""
    spec = services.spec
    groups = tuple(g.strip() for g in group_by.split(",") if g.strip())
    tenant = spec.datasource.tenant
    if tenant in groups:
        raise InvalidArgument(f"group_by: {tenant!r} is implied by the API key")
    time_range(from_, to)
    check_buckets(from_, to, granularity)
    req = AggregateRequest(
        start=from_,
        end=to,
        granularity=granularity,
        group_by=groups,
        filters={tenant: (merchant,)},
    )
    routed, result = run(services.reader, spec, req, force_base=force_base)
    names = result.columns
    buckets = [SalesBucket(**dict(zip(names, row, strict=True))) for row in result.rows]
    return SalesResponse(buckets=buckets, source=routed.source)
