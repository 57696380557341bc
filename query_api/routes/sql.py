"""``POST /v1/sql``: read-only SQL over the merchant's own rows (see ``sqlguard``)."""

from __future__ import annotations

import functools

from fastapi import APIRouter

from query_api.deps import MerchantDep, ServicesDep
from query_api.models import ErrorBody, SqlRequest, SqlResponse
from query_api.sqlguard import scope
from tally.errors import InvalidArgument
from tally.specs import SpecRegistry

router = APIRouter(tags=["sql"])


def readable(registry: SpecRegistry, *, rollups: bool) -> dict[str, str]:
    """Every datasource a merchant may read (and its rollups, where the engine stores
    them), with the column naming its tenant."""
    out: dict[str, str] = {}
    for spec in registry:
        out[spec.name] = spec.datasource.tenant
        for rollup in spec.rollups if rollups else ():
            out[rollup.name] = spec.datasource.tenant
    return out


@router.post(
    "/v1/sql",
    response_model=SqlResponse,
    responses={status: {"model": ErrorBody} for status in (400, 401, 403, 422, 429)},
)
def run_sql(body: SqlRequest, services: ServicesDep, merchant: MerchantDep) -> SqlResponse:
    """A SELECT in the given dialect, transpiled to the engine's; every datasource it
    names is narrowed to the key's merchant first, on each side of a join. Row and
    time limits apply."""
    api = services.settings.api
    reader = services.reader
    caps = reader.capabilities
    scoped = scope(
        body.sql,
        body.dialect.lower(),
        tenant_columns=readable(services.registry, rollups=caps.rollup_datasources),
        tenant=merchant,
        engine_dialect=caps.sql_dialect,
        row_limit=api.sql_row_limit,
        joins=caps.sql_joins,
        # Engines whose datasource names are raw rows read the merged relation instead.
        **(
            {}
            if caps.merged_views
            else {"source": functools.partial(reader.relation, tenants=[merchant])}
        ),
    )
    result = reader.query(scoped.sql, scoped.params, timeout_s=api.sql_timeout_s)
    if len(result.rows) > api.sql_row_limit:
        raise InvalidArgument(
            f"the result has more than {api.sql_row_limit:,} rows; aggregate or add a LIMIT"
        )
    return SqlResponse(columns=result.columns, rows=result.rows)
