"""The golden set, maintained: list, add, update and retire golden facts (`tuneship loop golden ...`, /v1/golden).

A golden fact is a row of `examples` with split "golden", kind "sft" and status "accepted"; `examples.golden(store)`
is what the gate reads, so every change here changes what the next gate checks. A row is never rewritten: its id
is its content (`golden-<example_id>`, as `registry.import_conversations` names them), so an update adds a row with
the new answer and marks the old one "superseded" (with the reason), and a retired fact is marked "superseded" too
(its reason says "retired"): it leaves the gate and stays in the store, counted. A new fact passes the same data
audit as a `loop.golden` file, and is refused when a golden fact already asks the same prompt. Every change is an
event (golden_added / golden_updated / golden_retired) with who and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tuneship.errors import TuneshipError
from tuneship.loop.examples import examples_by_id, golden, golden_count, prompt_key
from tuneship.loop.signals import example_id
from tuneship.loop.store import Store
from tuneship.loop.tables import Example, ExampleStatus

if TYPE_CHECKING:
    from tuneship.config import Config
    from tuneship.loop.registry import Loop

RETIRED: ExampleStatus = "superseded"  # what retire and update leave the old row as (out of the gate, kept)
LIST_HINT = "`tuneship loop golden list RUN` (or GET /v1/golden) shows the current ids"


class GoldenError(TuneshipError):
    """A golden fact that cannot be added, updated or retired as asked; `field` names the input at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnknownGolden(GoldenError):
    """No golden fact has that id."""


class GoldenConflict(GoldenError):
    """The change does not fit the golden set as it is: a fact with the same prompt, or one no longer current."""


@dataclass(frozen=True)
class GoldenRow:
    """One current golden fact as the list, the API and the Versions page show it."""

    id: str
    question: str
    answer: str
    system: str | None
    source: str

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "system": self.system,
            "source": self.source,
        }


def golden_rows(store: Store) -> list[GoldenRow]:
    """The golden facts the next gate checks, oldest first."""
    return [golden_row(e) for e in golden(store)]


def golden_row(example: Example) -> GoldenRow:
    messages = example.conversation["messages"]
    question = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), "")
    return GoldenRow(
        example.id, question, messages[-1]["content"], example.conversation.get("system"), _source(example)
    )


def _source(example: Example) -> str:
    provenance = example.provenance or {}
    if provenance.get("generation"):
        return f"feedback on {provenance['generation']}"
    return str(provenance.get("source") or provenance.get("file") or "")


def golden_warning(store: Store, min_golden: int) -> str | None:
    """A warning when fewer than `loop.min_golden` golden facts exist (the gate then checks too little)."""
    count = golden_count(store)
    if count >= min_golden:
        return None
    return (
        f"only {count} golden example{'' if count == 1 else 's'} (loop.min_golden={min_golden}): the gate checks "
        "too few facts to see what a new version forgets; add some with `tuneship loop golden add RUN --question Q "
        "--answer A`, a `loop.golden` file, or POST /v1/golden"
    )


def add_golden(loop: Loop, question: str, answer: str, system: str | None = None, actor: str = "cli") -> Example:
    """A new golden fact (audited), refused when a current golden fact has the same prompt."""
    turns = [{"role": "user", "content": _text("question", question)}, {"role": "assistant", "content": answer}]
    conversation = _audited(loop.cfg, turns, _system(system), actor)
    same = next((e for e in golden(loop.store) if prompt_key(e.conversation) == prompt_key(conversation)), None)
    if same is not None:
        raise GoldenConflict(
            f"question: golden fact {same.id} already asks this (answer {_short(golden_row(same).answer)}); "
            f"change its answer with `tuneship loop golden update RUN {same.id} --answer A` "
            f"(or POST /v1/golden/{same.id}/update)",
            "question",
        )
    example = _store_new(loop.store, conversation, {"source": f"golden add ({actor})", "actor": actor}, actor)
    row = golden_row(example)
    loop.store.add_event("golden_added", actor, f"golden fact added: {_short(row.question)}", row.to_json())
    return example


def update_golden(loop: Loop, golden_id: str, answer: str, actor: str = "cli", reason: str | None = None) -> Example:
    """A new row with the new answer; the old one becomes "superseded" with the reason (never rewritten)."""
    old = current_golden(loop.store, golden_id)
    turns = [*old.conversation["messages"][:-1], {"role": "assistant", "content": answer}]
    conversation = _audited(loop.cfg, turns, old.conversation.get("system"), actor)
    before = golden_row(old)
    if conversation["messages"][-1]["content"] == before.answer:
        raise GoldenError(f"answer: the same as the current answer of {golden_id}; nothing to change", "answer")
    provenance = {"source": f"golden update ({actor})", "actor": actor, "replaces": old.id}
    new = _store_new(loop.store, conversation, provenance, actor)
    why = reason or "answer updated"
    loop.store.set_example_status([old.id], RETIRED, f"updated by {actor}: {why}; replaced by {new.id}")
    data = {**golden_row(new).to_json(), "replaces": old.id, "old_answer": before.answer}
    loop.store.add_event("golden_updated", actor, f"{why}: {_short(before.question)}", data)
    return new


def retire_golden(loop: Loop, golden_id: str, actor: str = "cli", reason: str | None = None) -> Example:
    """The fact leaves the gate: its row becomes "superseded" with the reason (kept in the store)."""
    old = current_golden(loop.store, golden_id)
    why = reason or "retired by hand"
    loop.store.set_example_status([old.id], RETIRED, f"retired by {actor}: {why}")
    row = golden_row(old)
    loop.store.add_event("golden_retired", actor, f"{why}: {_short(row.question)}", row.to_json())
    [retired] = examples_by_id(loop.store, [old.id])
    return retired


def current_golden(store: Store, golden_id: str) -> Example:
    """The accepted golden fact with this id, or an error that says what it is instead."""
    found = [e for e in examples_by_id(store, [golden_id]) if e.split == "golden" and e.kind == "sft"]
    if not found:
        raise UnknownGolden(f"id: no golden fact {golden_id!r}; {LIST_HINT}", "id")
    example = found[0]
    if example.status != "accepted":
        raise GoldenConflict(
            f"id: golden fact {golden_id} is no longer in the gate ({example.status}: {example.reason}); {LIST_HINT}",
            "id",
        )
    return example


def _text(field: str, value: str) -> str:
    if not value.strip():
        raise GoldenError(f"{field}: empty; write the {field}", field)
    return value


def _system(system: str | None) -> str | None:
    if system is not None and not system.strip():
        raise GoldenError("system: empty; leave it out for no system prompt", "system")
    return system


def _audited(cfg: Config, turns: list[dict], system: str | None, actor: str) -> dict:
    """The conversation as the data audit keeps it (the rules a `loop.golden` file passes), as stored JSON."""
    from tuneship.data.audit import audit
    from tuneship.data.sources import RawRecord
    from tuneship.data.stage import audit_settings

    _text("answer", turns[-1]["content"])
    head = [{"role": "system", "content": system}] if system is not None else []
    settings = replace(audit_settings(cfg), format="messages", columns={}, objective="sft")
    result = audit([RawRecord(f"golden:{actor}", 1, {"messages": head + turns})], settings)
    if not result.kept:
        reasons = "; ".join(reason for dropped in result.dropped for reason in dropped["reasons"])
        raise GoldenError(f"the data audit drops this golden fact: {reasons}; fix it and try again", "answer")
    return result.kept[0].to_json()


def _store_new(store: Store, conversation: dict, provenance: dict, actor: str) -> Example:
    """The golden row of `conversation`; the same content golden before (retired, or updated away) comes back."""
    example = Example(
        id=f"golden-{example_id('sft', conversation)}",
        kind="sft",
        conversation=conversation,
        provenance=provenance,
        split="golden",
        status="accepted",
        used_in=[],
    )
    if not store.add_examples([example]):
        store.set_example_status([example.id], "accepted", f"golden again, by {actor}")
        [example] = examples_by_id(store, [example.id])
    return example


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
