"""Review decisions on examples waiting for it (`tuneship loop approve`, POST /v1/review), with an event saying who
decided. An approved conflict supersedes what it contradicts: a taught example by being the newer answer to the
same prompt (examples.latest_per_prompt), a golden fact by an update of the golden set (the gate then checks the
approved answer)."""

from __future__ import annotations

from typing import Literal

from tuneship.loop.conflicts import golden_facts, same_prompt
from tuneship.loop.examples import examples_by_id
from tuneship.loop.golden import update_golden
from tuneship.loop.registry import Loop
from tuneship.loop.tables import Example

GOLDEN_CONFLICT = "conflicts with golden"
DONE = {"approve": "approved", "reject": "rejected"}  # the event kinds


def review_examples(
    loop: Loop, ids: list[str], action: Literal["approve", "reject"], actor: str, reason: str | None = None
) -> int:
    """Accept or reject the pending examples among `ids`; returns how many changed."""
    store = loop.store
    pending = [e for e in examples_by_id(store, ids) if e.status == "pending_review"]
    done = DONE[action]
    reason = reason or f"{done} in review by {actor}"
    status = "accepted" if action == "approve" else "rejected"
    count = store.set_example_status([e.id for e in pending], status, reason)
    if action == "approve":
        for example in pending:
            if example.kind == "sft" and (example.reason or "").startswith(GOLDEN_CONFLICT):
                _update_contradicted_golden(loop, example, actor)
    store.add_event(done, actor, f"{count} examples {done}: {reason}", {"ids": [e.id for e in pending]})
    return count


def _update_contradicted_golden(loop: Loop, example: Example, actor: str) -> None:
    fact = same_prompt(example, golden_facts(loop.store), loop.cfg.data.near_duplicate_similarity)
    if fact is not None:
        answer = example.conversation["messages"][-1]["content"]
        update_golden(loop, fact.example_id, answer, actor, f"approved correction {example.id}")
