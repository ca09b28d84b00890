"""The API's errors: JSON `{"error": {"message", "type", "param"}}`, the shape OpenAI clients read, with a 4xx for
anything the client can fix (the field named in `param`), never a 500 for bad input."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, first = [], None
        for error in exc.errors():
            loc = [str(p) for p in error["loc"] if p not in ("body", "query", "path", "header")]
            field = ".".join(loc) or "body"
            first = first or field
            message = error["msg"].removeprefix("Value error, ")
            problems.append(message if message.startswith(f"{field}:") else f"{field}: {message}")
        return JSONResponse(error_body("; ".join(problems), "invalid_request_error", first), status_code=422)
