"""The API's errors: JSON `{"error": {"message", "type", "param"}}`, the shape OpenAI clients read, for every 4xx
and 5xx (pages' and unknown routes' too), with a 4xx for anything the client can fix (the field named in `param`),
never a 500 for bad input.

No body carries an internal path or an exception's text: paths are replaced by `<path>`, and a failure of the
server's own is a fixed message; the server log has the detail. A database that is locked or unreachable (any
SQLAlchemy error) and a TuneshipError that reaches the API are a 503 with Retry-After: try again shortly.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("tuneship.serve")
RETRY_AFTER_S = 2  # what a 503 of the database or the server asks a client to wait
# An absolute file path (two segments at least; not the API's own /v1/... routes, not inside a URL) or a Windows one.
PATH = re.compile(r"(?<![\w.:/~-])/(?!v1/)[^\s'\"`/;,()]+(?:/[^\s'\"`/;,()]*)+|\b[A-Za-z]:\\[^\s'\"`;,()]+")
STATUS_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found", 429: "rate_limit_exceeded"}


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param}}


def public(message: str) -> str:
    """The message with every file path replaced by `<path>` (what a client may see)."""
    return PATH.sub("<path>", message)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers  # e.g. Retry-After on a 429


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        body = error_body(public(exc.message), exc.kind, exc.param)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        log.info("%s %s: %s %s", request.method, request.url.path, exc.status_code, exc.detail)
        kind = STATUS_KINDS.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        body = error_body(public(str(exc.detail)), kind)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    install_unavailable_handlers(app)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, first = [], None
        for error in exc.errors():
            loc = [str(p) for p in error["loc"] if p not in ("body", "query", "path", "header")]
            field = ".".join(loc) or "body"
            first = first or field
            message = error["msg"].removeprefix("Value error, ")
            problems.append(message if message.startswith(f"{field}:") else f"{field}: {message}")
        return JSONResponse(error_body(public("; ".join(problems)), "invalid_request_error", first), status_code=422)


def install_unavailable_handlers(app: FastAPI) -> None:
    """503 + Retry-After for the database and for a TuneshipError that reaches the API; 500 for anything else;
    always the JSON error shape, the detail only in the log."""
    from sqlalchemy.exc import SQLAlchemyError

    from tuneship.errors import TuneshipError

    @app.exception_handler(SQLAlchemyError)
    async def database_unavailable(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.warning("%s %s: database error: %s", request.method, request.url.path, exc)
        message = "the loop's database is busy or unreachable; retry in a moment"
        return unavailable(message, "database_unavailable")

    @app.exception_handler(TuneshipError)
    async def cannot_now(request: Request, exc: TuneshipError) -> JSONResponse:
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return unavailable("the server cannot do this now; retry in a moment", "service_unavailable")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
        body = error_body("internal server error; the server log has the detail", "server_error")
        return JSONResponse(body, status_code=500)


def unavailable(message: str, kind: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error_body(message, kind), status_code=503, headers=headers)
