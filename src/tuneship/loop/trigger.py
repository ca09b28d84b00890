"""When a cycle runs: `loop.min_examples` new accepted examples, inside `loop.window` when set, never while
another cycle holds the lease, and not within `loop.backoff_seconds` of a failed cycle. Below the threshold, with
`loop.fast_path`, a few-shot candidate (kind "fewshot") is due by the same rules once new corrections came in.
By hand (`tuneship loop cycle [--kind fewshot]`, POST /v1/loop/cycle) only the lease applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from tuneship.config import LoopSection
from tuneship.loop.examples import waiting_examples
from tuneship.loop.fewshot import fast_path_due
from tuneship.loop.lease import CYCLE_LEASE
from tuneship.loop.store import Store
from tuneship.loop.tables import VersionKind, utcnow


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


def trigger_decision(store: Store, loop_cfg: LoopSection, now: datetime | None = None) -> TriggerDecision:
    """Whether a cycle is due now, which kind, and why (or why not)."""
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
