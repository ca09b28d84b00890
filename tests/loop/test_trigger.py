"""The trigger: threshold of new examples, time window, lease, back-off after a failed cycle."""

from datetime import datetime, timedelta

import pytest

from tests.loop.test_store import example
from tuneship.config import LoopSection
from tuneship.loop.tables import utcnow
from tuneship.loop.trigger import in_window, trigger_decision


@pytest.fixture
def loop_cfg():
    return LoopSection(min_examples=3, backoff_seconds=600)


def test_fires_at_the_threshold_of_new_examples_only(store, loop_cfg):
    store.add_examples([example("old", used_in=[1]), example("a"), example("b"), example("g", split="golden")])
    assert trigger_decision(store, loop_cfg).reason == "2/3 new examples"
    store.add_examples([example("c")])
    decision = trigger_decision(store, loop_cfg)
    assert decision.is_due and decision.reason == "3 new examples (threshold 3)"


def test_never_while_a_cycle_holds_the_lease(store, loop_cfg):
    store.add_examples([example(x) for x in "abc"])
    store.acquire_lease("cycle", "worker-1", 60, stage="train")
    decision = trigger_decision(store, loop_cfg)
    assert not decision.is_due and "a cycle is running (worker-1, stage train)" in decision.reason


def test_backs_off_after_a_failed_cycle(store, loop_cfg):
    store.add_examples([example(x) for x in "abc"])
    store.add_event("cycle_failed", "trigger", "train failed")
    assert "backing off" in trigger_decision(store, loop_cfg).reason
    later = utcnow() + timedelta(seconds=601)
    assert trigger_decision(store, loop_cfg, now=later).is_due


def test_only_inside_the_window(store, loop_cfg):
    store.add_examples([example(x) for x in "abc"])
    loop_cfg.window = "02:00-06:00"
    assert not trigger_decision(store, loop_cfg, now=datetime(2026, 1, 1, 12, 0)).is_due
    assert trigger_decision(store, loop_cfg, now=datetime(2026, 1, 1, 3, 0)).is_due


@pytest.mark.parametrize(
    "window, hour, expected",
    [
        ("02:00-06:00", 2, True),
        ("02:00-06:00", 6, False),
        ("22:00-02:00", 23, True),
        ("22:00-02:00", 1, True),
        ("22:00-02:00", 12, False),
        (None, 12, True),
    ],
)
def test_window_bounds(window, hour, expected):
    assert in_window(window, datetime(2026, 1, 1, hour, 0)) is expected
