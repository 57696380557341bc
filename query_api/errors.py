"""Every failure leaves the API with ``{"error": {"code", "message", "request_id"}}``.

Errors are translated here, at the HTTP boundary. Whose fault it is picks the class of
status: the server's or an engine's (a store or index down, busy or damaged; a broker;
anything unexpected) is 5xx, logged here with its details and the request id; the
caller's (a bad argument, an unknown id, a missing key) is 4xx. A message never carries
a filesystem path (the engines' errors name their files), a stack trace or anything the
caller did not send: the request id ties the client's line to the server's log.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from query_api.ratelimit import RateLimited
from tally.errors import (
    BrokerError,
    BrokerUnavailable,
    EngineError,
    EngineUnavailable,
    SearchUnavailable,
    StoreError,
    TallyError,
)

log = logging.getLogger(__name__)

STATUS = {
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "rate_limited": 429,
}
# The server's or an engine's fault, whatever the error says: 503 (retry later).
SERVER_FAULTS: tuple[type[TallyError], ...] = (
    StoreError,
    SearchUnavailable,
    BrokerUnavailable,
    BrokerError,
    EngineError,
    EngineUnavailable,
)
REQUEST_ID = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PATHS = re.compile(r"(?<![\w:/])/(?:[\w.@+-]+/)+[\w.@+-]*|[A-Za-z]:\\[^\s'\"]+")


def public(message: str) -> str:
    """``message`` as a client may see it: one line, with no filesystem path."""
    return _PATHS.sub("<file>", " ".join(message.split()))


def error_body(code: str, message: str, request_id: str = "") -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": public(message), "request_id": request_id}}


def status_of(exc: TallyError) -> int:
    if exc.code in STATUS:
        return STATUS[exc.code]
    if isinstance(exc, SERVER_FAULTS) or exc.transient:
        return 503
    return 400


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


async def with_request_id(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Every request gets an id (the caller's ``X-Request-ID`` if it is a plain token),
    answered in the same header and in every error body."""
    given = request.headers.get(REQUEST_ID, "")
    request.state.request_id = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    response = await call_next(request)
    response.headers[REQUEST_ID] = request.state.request_id
    return response


def install(app: FastAPI) -> None:
    @app.exception_handler(TallyError)
    async def tally_error(request: Request, exc: TallyError) -> JSONResponse:
        status = status_of(exc)
        rid = request_id(request)
        if status >= 500:
            cause = (
                f" (from {type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            )
            log.error(
                "request %s %s %s: %s: %s%s",
                rid,
                request.method,
                request.url.path,
                exc.code,
                exc.message,
                cause,
            )
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after_s)}
        headers[REQUEST_ID] = rid
        return JSONResponse(error_body(exc.code, exc.message, rid), status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        rid = request_id(request)
        body = error_body("invalid_request", _one_line(exc), rid)
        return JSONResponse(body, 422, headers={REQUEST_ID: rid})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        rid = request_id(request)
        body = error_body(code, str(exc.detail), rid)
        return JSONResponse(body, exc.status_code, headers={REQUEST_ID: rid})

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception("request %s %s %s: unhandled error", rid, request.method, request.url.path)
        body = error_body("internal", f"internal error (request {rid})", rid)
        return JSONResponse(body, 500, headers={REQUEST_ID: rid})


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
