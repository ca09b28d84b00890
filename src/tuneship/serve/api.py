"""The HTTP API: OpenAI-compatible chat (/v1/chat/completions, /v1/models), feedback, loop and versions.

When a key is set (auth.py), chat, models and feedback need a key (the admin key or a client key; the caller's name
is `request.state.client`) and everything else the admin key. Errors are JSON bodies (errors.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tuneship.errors import TuneshipError
from tuneship.serve.auth import client_name, require_admin, require_client
from tuneship.serve.errors import RETRY_AFTER_S, ApiError

if TYPE_CHECKING:
    from tuneship.config import ServeSection
    from tuneship.loop.tables import Version
    from tuneship.serve.backends import Reply, Stream

router = APIRouter()
log = logging.getLogger("tuneship.serve")
T = TypeVar("T")
MAX_TEXT = 100_000
MAX_VERSION_ID = 2**31 - 1  # a version id is a 32-bit integer in the store; larger is a 422, not a 500


# chat ---------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_TEXT)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., max_length=200)
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False


def _check_chat(request: ChatRequest, serve_cfg: ServeSection) -> int:
    if len(request.messages) > serve_cfg.max_messages:
        raise ApiError(
            422,
            f"messages: {len(request.messages)} messages, more than serve.max_messages={serve_cfg.max_messages}",
            param="messages",
        )
    if request.messages[-1].role != "user":
        raise ApiError(422, "messages: the last message must be from the user", param="messages")
    if any(m.role == "system" for m in request.messages[1:]):
        raise ApiError(422, "messages: a system message may only come first", param="messages")
    if request.max_tokens is not None and request.max_tokens > serve_cfg.max_tokens:
        raise ApiError(422, f"max_tokens: at most serve.max_tokens={serve_cfg.max_tokens}", param="max_tokens")
    return request.max_tokens or serve_cfg.max_tokens


@router.get("/v1/models", tags=["chat"], dependencies=[Depends(require_client)])
def list_models(request: Request) -> dict:
    names = dict.fromkeys(request.app.state.router.model_names())
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tuneship"} for n in names],
    }


@router.post("/v1/chat/completions", tags=["chat"], dependencies=[Depends(require_client)])
async def chat_completions(body: ChatRequest, request: Request):
    """OpenAI-compatible; the reply's `id` is the generation id to send feedback on. The chat waits for its turn
    on the model without holding a thread (beyond `serve.max_queue` waiting: 429 with Retry-After), and its
    generation stops between tokens when the client goes away or `serve.timeout` passes."""
    from tuneship.loop.store import new_id
    from tuneship.serve.backends import Ask

    app = request.app
    ask = Ask([m.model_dump() for m in body.messages], _check_chat(body, app.state.loop.cfg.serve), body.temperature)
    generation_id = new_id("chatcmpl")
    started = time.monotonic()
    gone = threading.Event()  # set when the client disconnects: the generation stops at its next token
    if body.stream:
        stream = await _answer(request, gone, app.state.router.open_stream(body.model, ask, gone))
        return StreamingResponse(
            _sse(app, body, generation_id, stream, started, gone),
            media_type="text/event-stream",
            background=BackgroundTask(gone.set),  # runs when the stream ends or the client is gone
        )
    reply = await _answer(request, gone, app.state.router.complete(body.model, ask, gone))
    recorded = False
    if not gone.is_set():  # nobody sees an answer to a client that left: nothing to record
        recorded = await run_in_threadpool(_record, app, body, generation_id, reply, started)
    return {
        "id": generation_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.answered_by,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": reply.finish_reason}
        ],
        "usage": _usage(reply),
        "tuneship": {
            "version": reply.version_id,
            "backend": reply.answered_by,
            "tried": reply.tried,
            "recorded": recorded,  # false: the store could not keep it (no feedback can be sent on this id)
        },
    }


async def _answer(request: Request, gone: threading.Event, answering: Coroutine[object, object, T]) -> T:
    """The router's answer; a client that disconnects meanwhile gives up its place in the queue or stops its
    generation. Refusals become API errors."""
    from tuneship.serve.backends import BackendError, UnknownModel
    from tuneship.serve.generation import Overloaded

    task = asyncio.ensure_future(answering)
    watcher = asyncio.create_task(_watch_disconnect(request, gone, task))
    try:
        return await task
    except asyncio.CancelledError:
        if not gone.is_set():  # the server itself is cancelling this request
            raise
        raise ApiError(499, "the client closed the request", "client_closed") from None  # seen by nobody
    except UnknownModel as exc:
        raise ApiError(404, str(exc), "model_not_found", "model") from None
    except Overloaded as exc:
        raise ApiError(429, str(exc), "rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after)}) from None
    except BackendError as exc:  # each target and why, paths left out (errors.public); the detail in the log
        log.warning("chat: %s", exc)
        raise ApiError(503, str(exc), "backend_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    finally:
        watcher.cancel()


async def _watch_disconnect(request: Request, gone: threading.Event, answering: asyncio.Future) -> None:
    """When the client disconnects: `gone` (the generation stops at its next token) and `answering` cancelled (a
    chat still waiting for its turn leaves the queue). The body is read by now: the next message is the
    disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()
    answering.cancel()


async def _sse(
    app: FastAPI, body: ChatRequest, generation_id: str, stream: Stream, started: float, gone: threading.Event
) -> AsyncIterator[str]:
    reply = stream.reply

    def chunk(delta: dict, finish: str | None, recorded: bool | None = None) -> str:
        payload = {
            "id": generation_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.answered_by,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "tuneship": {
                "version": reply.version_id,
                "backend": reply.answered_by,
                **({} if recorded is None else {"recorded": recorded}),  # on the last chunk
            },
        }
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        async for piece in stream.pieces():
            yield chunk({"content": piece}, None)
        recorded = await run_in_threadpool(_record, app, body, generation_id, reply, started)
        yield chunk({}, reply.finish_reason, recorded)
        yield "data: [DONE]\n\n"
    finally:
        gone.set()  # left early (the client is gone) or done: either way the generation is over


def _usage(reply: Reply) -> dict:
    prompt, completion = reply.prompt_tokens or 0, reply.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _record(app: FastAPI, body: ChatRequest, generation_id: str, reply: Reply, started: float) -> bool:
    """Store the generation; False (and the reason in the log) when the store cannot: the answer is still
    returned, saying `"recorded": false`, rather than lost behind an error."""
    from sqlalchemy.exc import SQLAlchemyError

    from tuneship.serve.backends import elapsed_ms

    try:
        app.state.loop.store.add_generation(
            id=generation_id,
            model=body.model,
            version_id=reply.version_id,
            backend=reply.answered_by,
            messages=[m.model_dump() for m in body.messages],
            answer=reply.text,
            finish_reason=reply.finish_reason,
            latency_ms=elapsed_ms(started),
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
        )
    except SQLAlchemyError as exc:
        log.warning("chat %s answered but not recorded: %s", generation_id, exc)
        return False
    return True


# feedback -----------------------------------------------------------------------------------


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation_id: str = Field(..., min_length=1, max_length=64)
    rating: str | int | None = Field(None, description='"up", "down" or a score 1..5')
    correction: str | None = Field(None, max_length=MAX_TEXT)
    comment: str | None = Field(None, max_length=MAX_TEXT)

    @field_validator("rating", mode="before")
    @classmethod
    def _known_rating(cls, value: object) -> str | None:
        from tuneship.loop.signals import normalize_rating

        return normalize_rating(value)


@router.post("/v1/feedback", status_code=201, tags=["loop"], dependencies=[Depends(require_client)])
def post_feedback(body: FeedbackRequest, request: Request, idempotency_key: str | None = Header(None)):
    """Rate or correct a generation. With an `Idempotency-Key` header (the client's own, bound to this body) a
    retry counts once (201, `replayed`); the same key with another body is 409."""
    from tuneship.loop.signals import check_feedback
    from tuneship.loop.store import IdempotencyConflict, UnknownGeneration

    try:
        rating, correction = check_feedback(body.rating, body.correction)
    except ValueError as exc:
        raise ApiError(422, str(exc), param=str(exc).split(":")[0]) from None
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 200:
        raise ApiError(422, "Idempotency-Key: 1 to 200 characters", param="Idempotency-Key")
    _limit_feedback(request)
    try:
        row, is_new = request.app.state.loop.store.add_feedback(
            body.generation_id, rating, correction, body.comment, idempotency_key, client=client_name(request)
        )
    except UnknownGeneration as exc:
        raise ApiError(404, str(exc), "not_found", "generation_id") from None
    except IdempotencyConflict as exc:
        raise ApiError(409, str(exc), "idempotency_conflict", "Idempotency-Key") from None
    trigger = getattr(request.app.state, "trigger", None)
    if trigger is not None and is_new:
        trigger.feedback_came()  # harvested now: the correction that reaches loop.min_examples starts the cycle
    return JSONResponse(
        {"id": row.id, "generation_id": row.generation_id, "replayed": not is_new},
        status_code=201,
        headers={"Idempotent-Replayed": "true"} if not is_new else None,
    )


def _limit_feedback(request: Request) -> None:
    """429 + Retry-After beyond serve.feedback_per_minute for this client (the admin, who imports and integrates,
    is not limited)."""
    client = client_name(request)
    if client == "admin":
        return
    limit = request.app.state.feedback_limit
    wait = limit.retry_after(client)
    if wait is not None:
        message = (
            f"feedback: more than serve.feedback_per_minute={limit.per_minute} from this client; retry in {wait} s"
        )
        raise ApiError(429, message, "rate_limit_exceeded", headers={"Retry-After": str(wait)})


# loop and versions --------------------------------------------------------------------------


@router.get("/v1/loop/status", tags=["loop"], dependencies=[Depends(require_admin)])
def get_loop_status(request: Request) -> dict:
    """Champion, examples waiting, threshold, the running cycle and its stage, the last cycle."""
    from tuneship.loop.status import status_report

    return status_report(request.app.state.loop)


@router.post("/v1/loop/cycle", status_code=202, tags=["loop"], dependencies=[Depends(require_admin)])
def start_cycle(request: Request, kind: Literal["finetune", "fewshot"] = "finetune") -> dict:
    """Start a cycle now, in its own process; 409 while one runs. `kind=fewshot`: the fast path's few-shot
    candidate (the newest corrections as example turns) instead of a fine-tuned challenger. With
    serve.cycles=external the request is recorded and the next `tuneship loop worker` to look runs it."""
    from tuneship.loop.lease import CYCLE_LEASE
    from tuneship.loop.worker import request_cycle

    loop, cycles = request.app.state.loop, request.app.state.cycles
    lease = loop.store.lease(CYCLE_LEASE)
    if lease is not None or cycles.running():
        raise ApiError(409, f"a cycle is already running ({lease.stage if lease else 'starting'})", "conflict")
    if loop.cfg.serve.cycles == "external":
        request_cycle(loop.store, "api", "requested through POST /v1/loop/cycle", kind)
        return {"started": False, "requested": True, "kind": kind}
    pid = cycles.start("api", "started through POST /v1/loop/cycle", loop.log_dir, kind)
    return {"started": True, "pid": pid, "kind": kind}


def version_json(version: Version) -> dict:
    return {
        "id": version.id,
        "name": version.name,
        "status": version.status,
        "kind": version.kind,
        "shot_count": version.shot_count,
        "shots": version.shots,
        "parent": version.parent_id,
        "run_dir": version.run_dir,
        "gguf": version.gguf,
        "adapter": version.adapter,
        "format": "adapter" if version.adapter else "merged",
        "created_at": version.created_at.isoformat(),
        "promoted_at": version.promoted_at.isoformat() if version.promoted_at else None,
        "metrics": {k: v for k, v in version.metrics.items() if not k.endswith("_examples")},
    }


@router.get("/v1/versions", tags=["versions"], dependencies=[Depends(require_admin)])
def list_versions(request: Request) -> dict:
    return {"data": [version_json(v) for v in request.app.state.loop.store.versions()]}


@router.get("/v1/loop/events", tags=["loop"], dependencies=[Depends(require_admin)])
def list_events(request: Request, limit: int = 100) -> dict:
    events = request.app.state.loop.store.events(limit=max(1, min(limit, 1000)))
    return {
        "data": [
            {
                "id": e.id,
                "at": e.at.isoformat(),
                "kind": e.kind,
                "version": e.version_id,
                "actor": e.actor,
                "reason": e.reason,
                "data": e.data,
            }
            for e in events
        ]
    }


@router.post("/v1/versions/{version_id}/promote", tags=["versions"], dependencies=[Depends(require_admin)])
def post_promote(request: Request, version_id: int = Path(..., ge=1, le=MAX_VERSION_ID)) -> dict:
    from tuneship.loop.promotion import promote_version
    from tuneship.loop.store import UnknownVersion

    try:
        version = promote_version(request.app.state.loop, version_id, "api", "promoted through the API")
    except UnknownVersion as exc:
        raise ApiError(404, str(exc), "not_found", "version_id") from None
    except TuneshipError as exc:
        raise ApiError(409, str(exc), "conflict", "version_id") from None
    return version_json(version)


@router.post("/v1/rollback", tags=["versions"], dependencies=[Depends(require_admin)])
def post_rollback(request: Request) -> dict:
    from tuneship.loop.promotion import restore_previous

    try:
        version = restore_previous(request.app.state.loop, "api", "rolled back through the API")
    except TuneshipError as exc:
        raise ApiError(409, str(exc), "conflict") from None
    return version_json(version)
