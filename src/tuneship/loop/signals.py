"""Feedback -> examples, by the rules of the loop, then the same data audit as any dataset.

- a correction: SFT (prompt, correction), a DPO pair (chosen correction, rejected original) and a KTO pair
  (correction desirable, original undesirable);
- thumbs up or a score >= 4: SFT (prompt, original) and KTO positive;
- thumbs down or a score <= 2 without a correction: KTO negative only, never SFT;
- a score of 3 without a correction: no signal;
- conflicting feedback on one generation (up and down, or two different corrections): dropped, and the
  reason is written on every feedback row involved (`feedback.outcome`), so it is counted, never lost.

New examples then pass the data audit (duplicates of earlier examples, empty answers, truncation, ...);
those it drops are kept in the store as status "rejected" with the audit's reasons. With `loop.review:
conflicts` (the default) the examples of a correction or answer that contradicts a taught or golden fact wait as
"pending_review" (conflicts.py); with `required` every new example waits until approved. No feedback is held out
as golden: every accepted correction is trained.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Literal

from tuneship.config import Config
from tuneship.data.audit import Measure
from tuneship.loop.conflicts import hold_conflicts
from tuneship.loop.store import Store
from tuneship.loop.trust import hold_distrusted
from tuneship.loop.tables import Example, ExampleKind, Feedback, Generation

Signal = Literal["correction", "positive", "negative", "neutral"]
UP = {"up", "4", "5"}
DOWN = {"down", "1", "2"}


@dataclass
class Harvest:
    """What one pass over new feedback produced, counted."""

    feedback: int = 0
    examples: Counter = field(default_factory=Counter)
    rejected_by_audit: int = 0
    held_for_review: int = 0
    dropped: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {
            "feedback": self.feedback,
            "examples": dict(self.examples),
            "rejected_by_audit": self.rejected_by_audit,
            "held_for_review": self.held_for_review,
            "dropped": dict(self.dropped),
        }


def normalize_rating(rating: object) -> str | None:
    """ "up"/"down"/1..5 (or "1".."5") -> the stored text; anything else is a ValueError naming the field."""
    if rating is None or rating in ("up", "down", "1", "2", "3", "4", "5"):
        return rating
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise ValueError(f'rating: expected "up", "down" or an integer 1..5, got {rating!r}')
    return str(rating)


def check_feedback(rating: object, correction: str | None) -> tuple[str | None, str | None]:
    """(rating, correction) validated: one of them is needed; an empty correction is an error."""
    rating = normalize_rating(rating)
    if correction is not None and not correction.strip():
        raise ValueError("correction: empty; send the corrected answer, or null with a rating")
    if rating is None and correction is None:
        raise ValueError("rating: a rating or a correction is required")
    return rating, correction


def signal_of(feedback: Feedback) -> Signal:
    if feedback.correction is not None:
        return "correction"
    if feedback.rating in UP:
        return "positive"
    if feedback.rating in DOWN:
        return "negative"
    return "neutral"


def conflict_reason(feedback: list[Feedback]) -> str | None:
    signals = {signal_of(f) for f in feedback}
    if "positive" in signals and signals & {"negative", "correction"}:
        return "conflict: positive and negative feedback on one generation"
    corrections = {f.correction.strip() for f in feedback if f.correction is not None}
    if len(corrections) > 1:
        return "conflict: different corrections of one generation"
    return None


def examples_for(generation: Generation, feedback: list[Feedback]) -> list[Example]:
    """The examples one generation's (non-conflicting) feedback makes."""
    prompt = list(generation.messages)
    provenance = {
        "generation": generation.id,
        "feedback": [f.id for f in feedback],
        "version": generation.version_id,
        "client": (feedback[-1].client if feedback else None) or "anonymous",
    }
    signals = {signal_of(f) for f in feedback}
    correction = next((f.correction for f in feedback if f.correction is not None), None)
    if correction is not None:
        is_changed = correction.strip() != generation.answer.strip()  # else its pair is dropped by the audit
        return [
            _example("sft", prompt, correction, provenance),
            _example("dpo", prompt, correction, provenance, rejected=generation.answer),
            _example("kto", prompt, correction, provenance, label=True),
            *([_example("kto", prompt, generation.answer, provenance, label=False)] if is_changed else []),
        ]
    if "positive" in signals:
        return [
            _example("sft", prompt, generation.answer, provenance),
            _example("kto", prompt, generation.answer, provenance, label=True),
        ]
    if "negative" in signals:
        return [_example("kto", prompt, generation.answer, provenance, label=False)]
    return []


def _example(
    kind: ExampleKind,
    prompt: list[dict],
    answer: str,
    provenance: dict,
    rejected: str | None = None,
    label: bool | None = None,
) -> Example:
    system = next((m["content"] for m in prompt if m["role"] == "system"), None)
    turns = [m for m in prompt if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
    conversation = {"system": system, "messages": turns, "source": {"file": provenance["generation"], "line": 0}}
    return Example(
        id=example_id(kind, conversation, rejected, label),
        kind=kind,
        conversation=conversation,
        rejected_answer=rejected,
        label=label,
        provenance=provenance,
        split="train",
        status="accepted",
        used_in=[],
    )


def example_id(kind: ExampleKind, conversation: dict, rejected: str | None = None, label: bool | None = None) -> str:
    """Stable: the same content always gets the same id, so an example is never stored (or counted) twice."""
    canonical = [kind, conversation.get("system"), conversation["messages"], rejected, label]
    return "ex-" + hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()[:24]


def harvest(store: Store, cfg: Config, measure: Measure | None = None) -> Harvest:
    """Turn every unprocessed feedback row into examples (or a counted drop), audit them, store them: the
    examples and the feedback marked processed in one transaction (a failure before it leaves the feedback
    unprocessed, for the next harvest; a harvest racing this one stores the same examples once)."""
    by_generation: dict[str, list[Feedback]] = defaultdict(list)
    for row in store.unprocessed_feedback():
        by_generation[row.generation_id].append(row)
    result = Harvest()
    new: list[Example] = []
    outcomes: dict[str, list[str]] = defaultdict(list)
    for generation_id, rows in by_generation.items():
        result.feedback += len(rows)
        outcome = _harvest_generation(store, generation_id, rows, new)
        outcomes[outcome] += [r.id for r in rows]
        if outcome.startswith("dropped"):
            result.dropped[outcome.removeprefix("dropped: ")] += len(rows)
    if cfg.loop.review == "required":
        for example in new:
            example.status = "pending_review"
    elif cfg.loop.review == "conflicts":
        result.held_for_review = hold_conflicts(store, new, cfg.data.near_duplicate_similarity)
    if cfg.loop.review != "required":
        result.held_for_review += hold_distrusted(store, new, cfg.loop.distrust_after)
    rejected = audit_new_examples(store, cfg, new, measure)
    result.rejected_by_audit = len(rejected)
    store.store_harvest(dict(outcomes), new)
    for example in new:
        if example.id not in rejected:
            result.examples[example.kind] += 1
    return result


def _harvest_generation(store: Store, generation_id: str, rows: list[Feedback], new: list[Example]) -> str:
    everything = store.feedback_for(generation_id)
    reason = conflict_reason(everything)
    if reason:
        return f"dropped: {reason}"
    made = examples_for(store.generation(generation_id), everything)
    if not made:
        return "no signal (score 3 without a correction)"
    new.extend(made)
    return "examples: " + ", ".join(sorted({e.kind for e in made}))


def audit_new_examples(store: Store, cfg: Config, new: list[Example], measure: Measure | None = None) -> dict[str, str]:
    """Run the data audit over earlier examples + the new ones of each kind; the new ones it drops are marked
    rejected (with the audit's reasons) and returned as {id: reason}."""
    from tuneship.data.audit import audit
    from tuneship.data.sources import RawRecord
    from tuneship.data.stage import audit_settings

    rejected: dict[str, str] = {}
    for kind in sorted({e.kind for e in new}):
        settings = replace(audit_settings(cfg, measure), objective=kind)  # each kind by its objective's rules
        earlier = [e for e in store.examples() if e.kind == kind]
        fresh = [e for e in new if e.kind == kind]
        records = [RawRecord(f"example:{e.id}", index, e.to_record()) for index, e in enumerate([*earlier, *fresh], 1)]
        result = audit(records, settings)
        for dropped in result.dropped:
            example_id_ = dropped["source"]["file"].removeprefix("example:")
            rejected[example_id_] = "; ".join(dropped["reasons"])
    for example in new:
        if example.id in rejected:
            example.status, example.reason = "rejected", rejected[example.id]
    return rejected
