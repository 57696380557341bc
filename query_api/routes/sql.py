"""``POST /v1/sql``: read-only SQL over the merchant's own rows (see ``sqlguard``)."""

from __future__ import annotations

import functools

from fastapi import APIRouter

from query_api.deps import MerchantDep, ServicesDep
from query_api.models import ErrorBody, SqlRequest, SqlResponse
from query_api.sqlguard import scope
from tally.errors import InvalidArgument

router = APIRouter(tags=["sql"])


@router.post(
    "/v1/sql",
    response_model=SqlResponse,
    responses={status: {"model": ErrorBody} for status in (400, 401, 403, 422, 429)},
)
def run_sql(body: SqlRequest, services: ServicesDep, merchant: MerchantDep) -> SqlResponse:
    """A SELECT in the given dialect, transpiled to the engine's; every datasource it
    names is narrowed to the key's merchant first. Row and time limits apply."""
    spec = services.spec
    api = services.settings.api
    reader = services.reader
    stored = reader.capabilities.rollup_datasources
    scoped = scope(
        body.sql,
        body.dialect.lower(),
        tenant_column=spec.datasource.tenant,
        tenant=merchant,
        tables=[spec.name, *(r.name for r in spec.rollups if stored)],
        engine_dialect=reader.capabilities.sql_dialect,
        row_limit=api.sql_row_limit,
        # Engines whose datasource names are raw rows read the merged relation instead.
        **(
            {}
            if reader.capabilities.merged_views
            else {"source": functools.partial(reader.relation, tenants=[merchant])}
        ),
    )
    result = reader.query(scoped.sql, scoped.params, timeout_s=api.sql_timeout_s)
    if len(result.rows) > api.sql_row_limit:
        raise InvalidArgument(
            f"the result has more than {api.sql_row_limit:,} rows; aggregate or add a LIMIT"
        )
    return SqlResponse(columns=result.columns, rows=result.rows)
