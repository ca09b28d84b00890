"""The golden set's API: the facts the gate checks (GET /v1/golden), and adding, updating and retiring them (all
need the admin key when one is set). The work is done by tuneship.loop.golden, the same as the CLI's."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from tuneship.loop.golden import (
    GoldenConflict,
    GoldenError,
    UnknownGolden,
    add_golden,
    golden_row,
    golden_rows,
    golden_warning,
    retire_golden,
    update_golden,
)
from tuneship.serve.api import MAX_TEXT
from tuneship.serve.auth import require_admin
from tuneship.serve.errors import ApiError

router = APIRouter(tags=["golden"], dependencies=[Depends(require_admin)])
MAX_REASON = 1000


class GoldenNew(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(..., min_length=1, max_length=MAX_TEXT)
    answer: str = Field(..., min_length=1, max_length=MAX_TEXT)
    system: str | None = Field(None, min_length=1, max_length=MAX_TEXT)


class GoldenUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(..., min_length=1, max_length=MAX_TEXT)
    reason: str | None = Field(None, max_length=MAX_REASON)


class GoldenRetire(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=MAX_REASON)


@router.get("/v1/golden")
def list_golden(request: Request) -> dict:
    """The current golden facts (what the next gate checks), with the loop.min_golden warning when too few."""
    loop = request.app.state.loop
    rows = golden_rows(loop.store)
    return {
        "object": "list",
        "count": len(rows),
        "min_golden": loop.cfg.loop.min_golden,
        "warning": golden_warning(loop.store, loop.cfg.loop.min_golden),
        "data": [row.to_json() for row in rows],
    }


@router.post("/v1/golden", status_code=201)
def post_golden(body: GoldenNew, request: Request) -> dict:
    """Add a golden fact (audited; 409 when a golden fact already asks the same prompt)."""
    try:
        example = add_golden(request.app.state.loop, body.question, body.answer, body.system, "api")
    except GoldenError as exc:
        raise api_error(exc) from None
    return golden_row(example).to_json()


@router.post("/v1/golden/{golden_id}/update")
def post_golden_update(golden_id: str, body: GoldenUpdate, request: Request) -> dict:
    """A new row with the new answer; the old one is kept as superseded (404: no such golden fact)."""
    try:
        example = update_golden(request.app.state.loop, golden_id, body.answer, "api", body.reason)
    except GoldenError as exc:
        raise api_error(exc) from None
    return {**golden_row(example).to_json(), "replaces": golden_id}


@router.post("/v1/golden/{golden_id}/retire")
def post_golden_retire(golden_id: str, request: Request, body: GoldenRetire | None = None) -> dict:
    """Take a golden fact out of the gate (its row is kept as superseded, with the reason)."""
    try:
        example = retire_golden(request.app.state.loop, golden_id, "api", body.reason if body else None)
    except GoldenError as exc:
        raise api_error(exc) from None
    return {"id": example.id, "status": example.status, "reason": example.reason}


def api_error(exc: GoldenError) -> ApiError:
    """404 for an unknown id, 409 for a conflict with the golden set, else 422 naming the field."""
    if isinstance(exc, UnknownGolden):
        return ApiError(404, str(exc), "not_found", exc.field)
    if isinstance(exc, GoldenConflict):
        return ApiError(409, str(exc), "conflict", exc.field)
    return ApiError(422, str(exc), param=exc.field)
