"""The review queue's API (`loop.review: required`): approve, reject or edit the examples one generation's
feedback made (the admin key when one is set). The Review page calls it from the browser with its sign-in
session, like any client would.

An edit never rewrites an example in place (an example's id is its content): the edited correction makes new
examples, which pass the data audit like any other; the pending ones it replaces are rejected with the reason.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from tuneship.data.audit import Measure
from tuneship.loop.store import Store
from tuneship.loop.tables import Example
from tuneship.serve.api import MAX_TEXT
from tuneship.serve.auth import require_admin
from tuneship.serve.errors import ApiError

router = APIRouter(tags=["review"], dependencies=[Depends(require_admin)])
MAX_BULK = 1000


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation_ids: list[str] = Field(..., min_length=1, max_length=MAX_BULK)
    action: Literal["approve", "reject"]
    reason: str | None = Field(None, max_length=1000)


class ReviewEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    correction: str = Field(..., min_length=1, max_length=MAX_TEXT)


@router.post("/v1/review")
def post_review(body: ReviewDecision, request: Request) -> dict:
    """Approve (accepted: they count toward the trigger) or reject the pending examples of these generations."""
    from tuneship.loop.approval import review_examples

    loop = request.app.state.loop
    ids = [e.id for generation_id in body.generation_ids for e in _pending(loop.store, generation_id)]
    updated = review_examples(loop, ids, body.action, "api", body.reason)
    return {"updated": updated, "status": "accepted" if body.action == "approve" else "rejected"}


@router.post("/v1/review/{generation_id}/edit")
def edit(generation_id: str, body: ReviewEdit, request: Request) -> dict:
    """Replace the pending examples of a generation by those its edited correction makes (audited)."""
    from tuneship.loop.signals import audit_new_examples, examples_for
    from tuneship.loop.tables import Feedback

    if not body.correction.strip():
        raise ApiError(422, "correction: empty; send the corrected answer", param="correction")
    loop = request.app.state.loop
    old = _pending(loop.store, generation_id)
    made = examples_for(loop.store.generation(generation_id), [Feedback(correction=body.correction, rating=None)])
    old_ids = {e.id for e in old}
    fresh = [e for e in made if e.id not in old_ids]
    rejected = audit_new_examples(loop.store, loop.cfg, fresh, _measure(request.app))
    loop.store.add_examples(fresh)
    kept = [e.id for e in made if e.id in old_ids]
    loop.store.set_example_status(kept, "accepted", "approved in review (edited)")
    loop.store.set_example_status(list(old_ids - set(kept)), "rejected", "replaced by an edit in review")
    return {"accepted": [e.id for e in fresh if e.id not in rejected] + kept, "rejected_by_audit": rejected}


def _pending(store: Store, generation_id: str) -> list[Example]:
    pending = [
        e for e in store.examples(status="pending_review") if (e.provenance or {}).get("generation") == generation_id
    ]
    if not pending:
        message = f"generation_ids: nothing pending review for {generation_id!r}"
        raise ApiError(404, message, "not_found", "generation_id")
    return pending


def _measure(app: FastAPI) -> Measure:
    """The champion's token counter, for the audit's truncation check (loaded once)."""
    from tuneship.loop.registry import version_chat_format

    if getattr(app.state, "review_measure", None) is None:
        app.state.review_measure = version_chat_format(app.state.router.replica.champion()).measure
    return app.state.review_measure
