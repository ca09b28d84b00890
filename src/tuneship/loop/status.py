"""The loop's state in one report: champion, examples waiting, the running cycle, the last one, the trigger, the
disk each version's own files take."""

from __future__ import annotations

from tuneship.loop.examples import waiting_count
from tuneship.loop.golden import golden_warning
from tuneship.loop.lease import CYCLE_LEASE
from tuneship.loop.prune import disk_use
from tuneship.loop.registry import Loop
from tuneship.loop.store import Store
from tuneship.loop.tables import utcnow
from tuneship.loop.trigger import trigger_decision

CYCLE_END_KINDS = ("cycle_finished", "cycle_failed")


def status_report(loop: Loop) -> dict:
    """What GET /v1/loop/status, `tuneship loop status` and the Loop page show."""
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
        "examples_waiting": waiting_count(store, cfg.objective),
        "examples_pending_review": store.count_examples(status="pending_review"),
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
        "cycles": loop.cfg.serve.cycles,
        "artifacts_url": cfg.artifacts_url,
        "replicas": replica_rows(store),
        "warnings": loop_warnings(loop),
        "disk": disk_use(loop),
    }


def replica_rows(store: Store) -> list[dict]:
    """Each serving process: the version it serves, how long ago it last reported, and why not the champion."""
    now = utcnow()
    return [
        {
            "id": r.id,
            "host": r.host,
            "url": r.url,
            "version": r.version_id,
            "reported_at": r.reported_at.isoformat(),
            "seconds_ago": round((now - r.reported_at).total_seconds(), 1),
            "problem": r.problem,
        }
        for r in store.replicas()
    ]


def loop_warnings(loop: Loop) -> list[str]:
    """What a person should fix for the loop to work well (the golden set below loop.min_golden)."""
    warning = golden_warning(loop.store, loop.cfg.loop.min_golden)
    return [warning] if warning else []


def format_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
