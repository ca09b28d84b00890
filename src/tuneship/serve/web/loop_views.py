"""What the Versions, Review and Loop pages show, read from the loop's store (rows come back detached)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tuneship.serve.web.runs import format_metric

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tuneship.loop.registry import Loop
    from tuneship.loop.store import Store
    from tuneship.loop.tables import Example

GOLDEN_METRICS = ("stop_rate", "exact_match", "f1")
CYCLE_STAGES = ("starting", "harvest", "train", "gate", "promote")
CYCLE_EVENT_KINDS = ("cycle_started", "gated", "cycle_finished", "cycle_failed")


@dataclass
class VersionRow:
    id: int
    name: str
    status: str
    parent_id: int | None
    created_at: datetime
    promoted_at: datetime | None
    has_gguf: bool
    golden: list[tuple[str, str, str]]  # (metric, this version, the champion it was gated against)
    decision: str | None = None
    is_promoted_by_gate: bool | None = None
    kind: str = "finetune"
    shot_count: int = 0
    is_adapter: bool = False  # loop.version_format adapter: a LoRA GGUF on the shared base GGUF

    @property
    def can_promote(self) -> bool:
        return self.has_gguf and self.status in ("candidate", "retired", "rejected")


def version_rows(store: Store) -> list[VersionRow]:
    """Every version, newest first, with its golden-set numbers beside its gate's champion and the decision."""
    gated = {}
    for event in store.events(limit=1000, kind="gated"):
        gated.setdefault(event.version_id, event)  # newest first: the latest decision wins
    rows = []
    for version in reversed(store.versions()):
        gate = version.metrics.get("gate", {})
        decision = gated.get(version.id)
        rows.append(
            VersionRow(
                version.id,
                version.name,
                version.status,
                version.parent_id,
                version.created_at,
                version.promoted_at,
                bool(version.gguf),
                golden_beside_champion(gate),
                decision.reason if decision else None,
                decision.data.get("promoted") if decision else None,
                version.kind,
                version.shot_count,
                bool(version.adapter),
            )
        )
    return rows


def golden_beside_champion(gate: dict[str, Any]) -> list[tuple[str, str, str]]:
    ours = gate.get("challenger", {}).get("golden", {})
    theirs = gate.get("champion", {}).get("golden", {})
    return [(m, format_metric(m, ours.get(m)), format_metric(m, theirs.get(m))) for m in GOLDEN_METRICS if m in ours]


@dataclass
class ReviewItem:
    """The pending examples one generation's feedback made, shown and decided together."""

    generation_id: str
    messages: list[dict]
    answer: str
    ratings: list[str]
    corrections: list[str]
    examples: list = field(default_factory=list)
    audit_notes: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def review_items(store: Store) -> list[ReviewItem]:
    pending = _by_generation(store.examples(status="pending_review"))
    rejected = _by_generation(store.examples(status="rejected"))
    items = []
    for generation_id, examples in pending.items():
        generation = store.generation(generation_id)
        if generation is None:
            continue
        feedback = store.feedback_for(generation_id)
        items.append(
            ReviewItem(
                generation_id,
                list(generation.messages),
                generation.answer,
                [f.rating for f in feedback if f.rating],
                [f.correction for f in feedback if f.correction],
                examples,
                [f"{e.kind}: {e.reason}" for e in rejected.get(generation_id, []) if e.reason],
            )
        )
    return items


def _by_generation(examples: list[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for example in examples:
        generation_id = (example.provenance or {}).get("generation")
        if generation_id:
            groups.setdefault(generation_id, []).append(example)
    return groups


def recent_cycles(store: Store, limit: int = 20) -> list:
    return [e for e in store.events(limit=200) if e.kind in CYCLE_EVENT_KINDS][:limit]


def cycle_progress(stage: str | None) -> tuple[int, int]:
    """(step, of) of a running cycle's stage, for a progress bar."""
    step = CYCLE_STAGES.index(stage) + 1 if stage in CYCLE_STAGES else 0
    return step, len(CYCLE_STAGES)


def playground_context(loop: Loop, app: FastAPI) -> dict:
    return {"models": list(dict.fromkeys(app.state.router.model_names()))}


def review_context(loop: Loop, _app: FastAPI) -> dict:
    return {"items": review_items(loop.store), "unprocessed": len(loop.store.unprocessed_feedback())}


def versions_context(loop: Loop, _app: FastAPI) -> dict:
    from tuneship.loop.golden import golden_rows, golden_warning
    from tuneship.loop.promotion import previous_champion

    return {
        "versions": version_rows(loop.store),
        "previous": previous_champion(loop),
        "events": loop.store.events(limit=50),
        "golden": golden_rows(loop.store),
        "golden_warning": golden_warning(loop.store, loop.cfg.loop.min_golden),
    }


def loop_context(loop: Loop, _app: FastAPI) -> dict:
    from tuneship.loop.status import format_bytes, status_report

    status = status_report(loop)
    running = status["cycle_running"]
    disk = status["disk"]
    return {
        "status": status,
        "progress": cycle_progress(running["stage"] if running else None),
        "stages": CYCLE_STAGES,
        "events": recent_cycles(loop.store),
        "disk": [(v.id, v.name, v.status, format_bytes(disk.get(v.id, 0))) for v in reversed(loop.store.versions())],
        "disk_total": format_bytes(sum(disk.values())),
    }
