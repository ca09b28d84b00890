"""Conflicts (`loop.review: conflicts`, the default): a correction or a thumbs-up answer whose prompt is one a
promoted version was taught, or a golden prompt (the same prompt, or a near-duplicate by the audit's own MinHash
check), but whose answer differs, is held for review instead of trained. Both answers and where the taught one
came from go into the reason, so a person decides which is right; corrections of what the model was never
taught go straight in.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneship.data.near_duplicates import jaccard, shingles
from tuneship.loop.examples import golden, learned_facts, prompt_key
from tuneship.loop.store import Store
from tuneship.loop.tables import Example


@dataclass(frozen=True)
class KnownFact:
    """A prompt with the answer the loop already holds for it, and where that answer came from."""

    prompt: str
    question: str
    answer: str
    origin: str
    example_id: str


def known_facts(store: Store) -> list[KnownFact]:
    """What promoted versions were taught (and still hold) and the golden facts."""
    return [_fact(e, _taught_origin(store, e)) for e in learned_facts(store, set())] + golden_facts(store)


def golden_facts(store: Store) -> list[KnownFact]:
    return [_fact(e, _golden_origin(e)) for e in golden(store)]


def _fact(example: Example, origin: str) -> KnownFact:
    messages = example.conversation["messages"]
    prompt = prompt_key(example.conversation)
    return KnownFact(prompt, question_of(example), messages[-1]["content"], origin, example.id)


def question_of(example: Example) -> str:
    """The last user turn before the answer ("" for an answer without one)."""
    asked = [m["content"] for m in example.conversation["messages"][:-1] if m["role"] == "user"]
    return asked[-1] if asked else ""


def _taught_origin(store: Store, example: Example) -> str:
    source = (example.provenance or {}).get("source")
    if source:
        return source
    promoted = sorted(v.id for v in store.versions() if v.status in ("champion", "retired") and v.id in example.used_in)
    return f"version v{promoted[0]}" if promoted else "a taught example"


def _golden_origin(example: Example) -> str:
    source = (example.provenance or {}).get("source")
    return f"golden ({source})" if source else "golden"


def same_prompt(example: Example, facts: list[KnownFact], similarity: float) -> KnownFact | None:
    """The known fact asking the example's prompt, or a near-duplicate of its question, if any."""
    prompt = prompt_key(example.conversation)
    fact = next((f for f in facts if f.prompt == prompt), None)
    if fact is None and question_of(example).strip():
        question = shingles(question_of(example))
        fact = next((f for f in facts if jaccard(question, shingles(f.question)) >= similarity), None)
    return fact


def conflict_with(example: Example, facts: list[KnownFact], similarity: float) -> str | None:
    """The reason an SFT example conflicts with a known fact, or None."""
    answer = example.conversation["messages"][-1]["content"]
    fact = same_prompt(example, facts, similarity)
    if fact is None or fact.answer.strip() == answer.strip():
        return None
    return f"conflicts with {fact.origin}: taught answer {fact.answer!r}, this answer {answer!r}"


def hold_conflicts(store: Store, new: list[Example], similarity: float) -> int:
    """Mark the examples of each generation whose SFT example conflicts as pending review, with the reason.
    Returns how many generations were held."""
    if not new:  # every trigger tick harvests; most find nothing
        return 0
    facts = known_facts(store)
    reasons = {}
    for example in new:
        if example.kind == "sft" and example.provenance.get("generation"):
            reason = conflict_with(example, facts, similarity)
            if reason:
                reasons[example.provenance["generation"]] = reason
    for example in new:
        reason = reasons.get(example.provenance.get("generation"))
        if reason:
            example.status, example.reason = "pending_review", reason
    return len(reasons)
