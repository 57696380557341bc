"""``GET /dashboard`` (merchants) and ``GET /console`` (operators): static pages that
call the public HTTP API from the browser with the key the user signs in with.

No build step and no CDN: the HTML, CSS and JavaScript are files in
``query_api/web`` (uPlot vendored with its licence), served as they are. The only
thing the server adds is the datasource's shape (columns, enumerations, time zone) as
a JSON block, what a dashboard team would read from the spec. A strict Content
Security Policy allows only this origin's scripts, styles and API.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from query_api.deps import ServicesDep
from query_api.services import Services
from tally.specs import DatasourceSpec

WEB = Path(__file__).resolve().parents[1] / "web"
router = APIRouter(include_in_schema=False)
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def static_files() -> StaticFiles:
    return StaticFiles(directory=WEB)


def page_config(spec: DatasourceSpec, refresh_s: float) -> dict[str, object]:
    ds = spec.datasource

    def values(name: str) -> list[str]:
        column = spec.columns.get(name)
        return list(column.values or ()) if column is not None else []

    return {
        "datasource": spec.name,
        "timezone": ds.timezone,
        "key": ds.key,
        "time": ds.time,
        "tenant": ds.tenant,
        "searchable": list(ds.searchable),
        "columns": list(spec.columns),
        "statuses": values("status"),
        "methods": values("method"),
        "refresh_ms": int(refresh_s * 1000),
    }


@cache
def _template(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


def _page(name: str, services: Services) -> HTMLResponse:
    config = page_config(services.spec, services.settings.api.page_refresh_s)
    text = json.dumps(config).replace("</", "<\\/")
    html = _template(name).replace("<!--CONFIG-->", text)
    return HTMLResponse(html, headers=HEADERS)


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(services: ServicesDep) -> HTMLResponse:
    return _page("dashboard.html", services)


@router.get("/console", response_class=HTMLResponse)
def console(services: ServicesDep) -> HTMLResponse:
    return _page("console.html", services)
