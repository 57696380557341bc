"""The FastAPI application: ``create_app(settings)``; ``tally serve`` runs it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from query_api import errors, metrics
from query_api.routes import (
    backends,
    compaction,
    dead_letters,
    health,
    ingestion,
    ledger,
    pages,
    sales,
    sql,
    transactions,
)
from query_api.services import Services
from tally.settings import HANDOFF_ENV, Settings, from_handoff, load_settings
from tally.specs import SpecRegistry, spec_paths


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings(None)
    registry = SpecRegistry.load(spec_paths(settings.specs))
    spec = registry.get(settings.api.datasource)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.open(settings, registry)
        app.state.services = services
        try:
            yield
        finally:
            services.close()

    app = FastAPI(
        title="Tally query API",
        version="1",
        description="Merchant-scoped transactions, hybrid search and sales aggregates.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.middleware("http")(metrics.middleware)
    app.middleware("http")(errors.with_request_id)  # outermost: every response has one
    app.include_router(health.router)
    app.include_router(sales.router)
    app.include_router(ledger.router)
    app.include_router(transactions.build(spec, registry.related(spec.name)))
    app.include_router(sql.router)
    for admin in (ingestion, dead_letters, compaction, backends):
        app.include_router(admin.router)
    app.include_router(pages.router)
    app.mount("/static", pages.static_files(), name="static")
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the settings ``tally serve`` handed over,
    else the environment's."""
    text = os.environ.get(HANDOFF_ENV)
    return create_app(from_handoff(text) if text else None)
