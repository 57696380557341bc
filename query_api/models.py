"""Response models: the shapes in DESIGN §6, explicit so OpenAPI documents them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tally.specs import DatasourceSpec

_PY_TYPES: dict[str, Any] = {"string": str, "int": int, "timestamp": datetime, "bool": bool}


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str = Field("", description="also in the X-Request-ID header and the server log")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Freshness(BaseModel):
    olap: datetime | None = Field(description="newest committed event time in the store")
    search: datetime | None = Field(description="newest committed event time in the index")


class SalesBucket(BaseModel):
    """One bucket; each ``group_by`` column appears as an extra string field."""

    model_config = ConfigDict(extra="allow")

    bucket: datetime
    count: int
    gross_amount: int
    canceled_amount: int
    net_amount: int


class SalesResponse(BaseModel):
    buckets: list[SalesBucket]
    source: str = Field(description="the rollup that answered, or 'base'")


class LedgerBucket(BaseModel):
    """One bucket of one currency, in its minor units."""

    bucket: datetime
    currency: str
    count: int = Field(description="payments approved in the bucket")
    gross: int
    canceled: int
    net: int = Field(description="gross - canceled")
    fees: int = Field(description="fees of the payouts made in the bucket")
    vat: int = Field(description="VAT on those fees")
    settled: int = Field(description="paid to the merchant in the bucket")
    unsettled: int = Field(
        description="at the bucket's end: the net of every payment approved by then, less"
        " what every payout made by then covered (fees + VAT + settled)"
    )


class LedgerResponse(BaseModel):
    buckets: list[LedgerBucket]
    sources: dict[str, str] = Field(
        description="per datasource, the rollup that answered it, or 'base'"
    )


class SqlRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000)
    dialect: str = Field("mysql", description="mysql, starrocks, postgres, duckdb, ...")


class SqlResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]


class Health(BaseModel):
    status: str = Field(description="ready, degraded (some partitions damaged) or not ready")
    checks: dict[str, str] = {}
    damaged: list[str] = Field(
        default_factory=list, description="<datasource>/<partition> whose stored files are damaged"
    )


def transaction_model(spec: DatasourceSpec, name: str = "Transaction") -> type[BaseModel]:
    """Every column of the datasource, typed from its spec."""
    fields: dict[str, Any] = {}
    for column_name, column in spec.columns.items():
        typ = _PY_TYPES[column.type]
        fields[column_name] = (typ | None, None) if column.nullable else (typ, ...)
    return create_model(name, **fields)


def details_model(item: type[BaseModel], related: Sequence[DatasourceSpec]) -> type[BaseModel]:
    """One entity with the entity of each related datasource (a payment's settlement)
    under its ``relation.as`` name: null while it has none."""
    fields: dict[str, Any] = {}
    for other in related:
        assert other.relation is not None
        model = transaction_model(other, other.relation.as_.title().replace("_", ""))
        fields[other.relation.as_] = (
            model | None,
            Field(None, description=f"the {other.name} row of the same key, or null"),
        )
    return create_model(f"{item.__name__}Details", __base__=item, **fields)


class IndexCoverage(BaseModel):
    """What the search index holds of the datasource when it is not everything (its
    ``[sinks.search]`` in the spec): a keyword finds only events it kept."""

    sample: float = Field(description="share of the keys indexed (decided by key)")
    filter: str | None = Field(description="the predicate an event passed to be indexed")


def transactions_model(item: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        "Transactions",
        items=(list[item], ...),  # type: ignore[valid-type]
        next_cursor=(str | None, None),
        freshness=(Freshness, ...),
        search_coverage=(
            IndexCoverage | None,
            Field(
                None,
                description="set when a keyword was answered through an index that holds"
                " only a sample or a filtered part of the datasource; null when it holds"
                " every event or no keyword was asked",
            ),
        ),
    )


# --- operator routes (/v1/admin, admin keys) ----------------------------------------


class PartitionPosition(BaseModel):
    partition: int
    committed: int | None = Field(description="next offset the sink will read (durable)")
    end: int | None = Field(description="the partition's end on the broker")
    lag: int | None = Field(
        description="end minus committed; null when unknown (an end below the committed offset)"
    )


class SinkStatus(BaseModel):
    sink: str
    group: str
    freshness: datetime | None = Field(description="newest event time the sink committed")
    partitions: list[PartitionPosition]


class IngestionStatus(BaseModel):
    datasource: str
    topic: str
    sinks: list[SinkStatus]


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    reason: str | None = None
    sink: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    failed_at: float | None = None
    key: str | None = None
    value: str | None = None


class DeadLetters(BaseModel):
    datasource: str
    topic: str
    recorded: int = Field(description="letters the sinks recorded")
    unpublished: int = Field(description="recorded, not yet on the dead-letter topic")
    dead_letters: list[DeadLetter] = Field(description="the newest first")


class Replayed(BaseModel):
    replayed: int = Field(description="letters republished to their source topic")


class CompactionPartition(BaseModel):
    datasource: str
    partition: str
    segments: int
    rows: int
    bytes: int
    late_rows: int
    last_compacted_at: datetime | None
    due: bool
    damaged: str | None = Field(None, description="why its stored files cannot be read, if so")


class CompactionRun(BaseModel):
    datasource: str
    partition: str
    kind: str
    segments_in: int
    rows_in: int | None
    rows_out: int | None
    bytes_in: int | None
    bytes_out: int | None
    due_since: datetime | None
    started_at: datetime | None
    finished_at: datetime
    detect_to_done_s: float | None


class CompactionStatus(BaseModel):
    partitions: list[CompactionPartition]
    runs: list[CompactionRun] = Field(description="the newest first")


class Backend(BaseModel):
    role: str
    backend: str
    status: str = Field(description="'ok', or why not")
    detail: dict[str, Any] = {}


class Backends(BaseModel):
    backends: list[Backend]


ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 403, 422, 429, 503)
}
