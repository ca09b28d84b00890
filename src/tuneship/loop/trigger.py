"""When a cycle runs: `loop.min_examples` new accepted examples, inside `loop.window` when set, never while
another cycle holds the lease, and not within `loop.backoff_seconds` of a failed cycle. Below the threshold, with
`loop.fast_path`, a few-shot candidate (kind "fewshot") is due by the same rules once new corrections came in.
After a rejected cycle, what is left of its batch once the blamed examples went to review is retried at once;
the same batch with nothing blamed waits for new examples. By hand (`tuneship loop cycle [--kind fewshot]`,
POST /v1/loop/cycle) only the lease applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from tuneship.config import LoopSection
from tuneship.loop.examples import waiting_examples
from tuneship.loop.fewshot import fast_path_due
from tuneship.loop.lease import CYCLE_LEASE
from tuneship.loop.store import Store
from tuneship.loop.tables import Version, VersionKind, utcnow


@dataclass
class TriggerDecision:
    is_due: bool
    reason: str
    kind: VersionKind = "finetune"


def in_window(window: str | None, now: datetime) -> bool:
    """ "02:00-06:00" (UTC); a window that wraps midnight ("22:00-02:00") works too."""
    if not window:
        return True
    start_text, end_text = window.split("-")
    start, end, current = time.fromisoformat(start_text), time.fromisoformat(end_text), now.time()
    return start <= current < end if start <= end else current >= start or current < end


def last_rejected_batch(store: Store) -> Version | None:
    """The latest fine-tuned version, when the gate rejected it (not one that ended stale: the champion moved
    under it, and its batch is tried again against the new one)."""
    finetuned = [v for v in store.versions() if v.kind == "finetune" and v.parent_id is not None]
    last = finetuned[-1] if finetuned else None
    return last if last is not None and last.status == "rejected" and "stale" not in last.metrics else None


def finetune_due(store: Store, loop_cfg: LoopSection) -> tuple[str | None, str]:
    """(why a fine-tune cycle is due or None, why not). Due at `loop.min_examples` waiting examples, and at once
    for what is left of a rejected batch after its blamed examples went to review; never for the very batch the
    gate just rejected with nothing to blame (it would be rejected again: new examples must come first)."""
    waiting = {e.id for e in waiting_examples(store, loop_cfg.objective)}
    count = f"{len(waiting)}/{loop_cfg.min_examples} new examples"
    rejected = last_rejected_batch(store)
    if rejected is not None and waiting and waiting <= set(rejected.metrics.get("new_examples", [])):
        blamed = rejected.metrics.get("blamed") or {}
        if blamed:
            return f"retry of v{rejected.id}'s batch without the {len(blamed)} examples blamed for its rejection", count
        return None, f"{count}, all in v{rejected.id}, which the gate rejected; waiting for new examples"
    if len(waiting) >= loop_cfg.min_examples:
        return f"{len(waiting)} new examples (threshold {loop_cfg.min_examples})", count
    return None, count


def trigger_decision(store: Store, loop_cfg: LoopSection, now: datetime | None = None) -> TriggerDecision:
    """Whether a cycle is due now, which kind, and why (or why not)."""
    now = now or utcnow()
    lease = store.lease(CYCLE_LEASE)
    if lease is not None:
        return TriggerDecision(False, f"a cycle is running ({lease.holder}, stage {lease.stage})")
    kind: VersionKind = "finetune"
    due_because, not_due = finetune_due(store, loop_cfg)
    if due_because is None:
        fast_path = fast_path_due(store, loop_cfg)
        if fast_path is None:
            return TriggerDecision(False, not_due)
        kind, due_because = "fewshot", f"{not_due}; {fast_path}"
    if not in_window(loop_cfg.window, now):
        return TriggerDecision(False, f"outside loop.window {loop_cfg.window} (UTC)")
    failed = store.events(limit=1, kind="cycle_failed")
    if failed and now - failed[0].at < timedelta(seconds=loop_cfg.backoff_seconds):
        wait = timedelta(seconds=loop_cfg.backoff_seconds) - (now - failed[0].at)
        return TriggerDecision(False, f"backing off after a failed cycle ({wait.seconds} s left)")
    return TriggerDecision(True, due_because, kind)
