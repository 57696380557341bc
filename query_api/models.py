"""Response models: the shapes in DESIGN §6, explicit so OpenAPI documents them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tally.specs import DatasourceSpec

_PY_TYPES: dict[str, Any] = {"string": str, "int": int, "timestamp": datetime, "bool": bool}


class ErrorDetail(BaseModel):
    code: str
    message: str


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


class SqlRequest(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000)
    dialect: str = Field("mysql", description="mysql, starrocks, postgres, duckdb, ...")


class SqlResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


def transaction_model(spec: DatasourceSpec) -> type[BaseModel]:
    """Every column of the datasource, typed from its spec."""
    fields: dict[str, Any] = {}
    for name, column in spec.columns.items():
        typ = _PY_TYPES[column.type]
        fields[name] = (typ | None, None) if column.nullable else (typ, ...)
    return create_model("Transaction", **fields)


def transactions_model(item: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        "Transactions",
        items=(list[item], ...),  # type: ignore[valid-type]
        next_cursor=(str | None, None),
        freshness=(Freshness, ...),
    )
