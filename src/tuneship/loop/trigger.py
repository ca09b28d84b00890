"""When a cycle runs: `loop.min_examples` new accepted examples, inside `loop.window` when set, never while
another cycle holds the lease, and not within `loop.backoff_seconds` of a failed cycle. Below the threshold, with
`loop.fast_path`, a few-shot candidate (kind "fewshot") is due by the same rules once new corrections came in.
By hand (`tuneship loop cycle [--kind fewshot]`, POST /v1/loop/cycle) only the lease applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from tuneship.loop.fewshot import fast_path_due
from tuneship.loop.models import Example, VersionKind, utcnow

CYCLE_LEASE = "cycle"
FAILED_KINDS = ("cycle_failed",)
CYCLE_END_KINDS = ("cycle_finished", "cycle_failed")


@dataclass
class TriggerDecision:
    is_due: bool
    reason: str
    kind: VersionKind = "finetune"


def waiting_examples(store, objective: str = "sft") -> list[Example]:
    """New accepted training examples no version has trained on yet."""
    return [e for e in store.examples(status="accepted", split="train", unused=True) if e.kind == objective]


def in_window(window: str | None, now: datetime) -> bool:
    """ "02:00-06:00" (UTC); a window that wraps midnight ("22:00-02:00") works too."""
    if not window:
        return True
    start_text, end_text = window.split("-")
    start, end, current = time.fromisoformat(start_text), time.fromisoformat(end_text), now.time()
    return start <= current < end if start <= end else current >= start or current < end


def trigger_decision(store, loop_cfg, now: datetime | None = None) -> TriggerDecision:
    now = now or utcnow()
    lease = store.lease(CYCLE_LEASE)
    if lease is not None:
        return TriggerDecision(False, f"a cycle is running ({lease.holder}, stage {lease.stage})")
    waiting = len(waiting_examples(store, loop_cfg.objective))
    kind: VersionKind = "finetune"
    due_because = f"{waiting} new examples (threshold {loop_cfg.min_examples})"
    if waiting < loop_cfg.min_examples:
        fast_path = fast_path_due(store, loop_cfg)
        if fast_path is None:
            return TriggerDecision(False, f"{waiting}/{loop_cfg.min_examples} new examples")
        kind, due_because = "fewshot", f"{waiting}/{loop_cfg.min_examples} new examples; {fast_path}"
    if not in_window(loop_cfg.window, now):
        return TriggerDecision(False, f"outside loop.window {loop_cfg.window} (UTC)")
    failed = store.events(limit=1, kind="cycle_failed")
    if failed and now - failed[0].at < timedelta(seconds=loop_cfg.backoff_seconds):
        wait = timedelta(seconds=loop_cfg.backoff_seconds) - (now - failed[0].at)
        return TriggerDecision(False, f"backing off after a failed cycle ({wait.seconds} s left)")
    return TriggerDecision(True, due_because, kind)


def loop_status(loop) -> dict:
    """What GET /v1/loop/status and `tuneship loop status` show."""
    store, cfg = loop.store, loop.cfg.loop
    champion = store.champion()
    lease = store.lease(CYCLE_LEASE)
    last = next((e for e in store.events(limit=50) if e.kind in CYCLE_END_KINDS), None)
    decision = trigger_decision(store, cfg)
    return {
        "name": loop.name,
        "champion": None
        if champion is None
        else {"id": champion.id, "name": champion.name, "gguf": champion.gguf, "run_dir": champion.run_dir},
        "examples_waiting": len(waiting_examples(store, cfg.objective)),
        "examples_pending_review": len(store.examples(status="pending_review")),
        "threshold": cfg.min_examples,
        "window": cfg.window,
        "cycle_running": None
        if lease is None
        else {
            "holder": lease.holder,
            "stage": lease.stage,
            "version": lease.version_id,
            "until": lease.expires_at.isoformat(),
        },
        "last_cycle": None
        if last is None
        else {"kind": last.kind, "at": last.at.isoformat(), "version": last.version_id, "reason": last.reason},
        "trigger": {"is_due": decision.is_due, "reason": decision.reason, "kind": decision.kind},
        "fast_path": cfg.fast_path,
        "database": store.url,
    }
