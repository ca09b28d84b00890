"""kill -9 of a process in the middle of a harvest and of a promotion (the process is stopped inside the store's
transaction, after its writes and before its commit): on restart, one champion, and no feedback marked processed
without its examples."""

import os
import signal
import subprocess
import sys

from tests.conftest import REPO
from tests.loop.test_cli import shop_loop
from tests.loop.test_conflicts import correct
from tuneship.loop.registry import open_loop
from tuneship.loop.signals import harvest

# Runs in a child process: wraps one of the store's in-transaction helpers so that it flushes its writes, says so
# and then waits to be killed.
CHILD = """
import sys, time
import tuneship.loop.store as store
from tuneship.loop.registry import open_loop
from tuneship.loop.signals import harvest

helper_name = sys.argv[2]
helper = getattr(store, helper_name)

def stopped_inside(session, *args):
    helper(session, *args)
    session.flush()
    print("inside the transaction", flush=True)
    time.sleep(120)

setattr(store, helper_name, stopped_inside)
loop = open_loop(sys.argv[1])
if helper_name == "_mark_processed":
    harvest(loop.store, loop.cfg)
else:
    loop.store.promote(2, "child", "to be killed")
"""


def killed_inside(config, helper_name: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config), helper_name], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "inside the transaction"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL


def test_a_harvest_killed_mid_transaction_leaves_the_feedback_unprocessed_and_the_next_one_stores_it(tmp_path):
    loop = shop_loop(tmp_path, 3)
    for index in range(3):
        correct(loop, f"gen-{index}", f"New question {index}?", f"New answer {index}.")
    killed_inside(loop.target, "_mark_processed")

    after = open_loop(loop.target)
    assert len(after.store.unprocessed_feedback()) == 3
    assert [e for e in after.store.examples() if e.provenance.get("generation")] == []
    harvest(after.store, after.cfg)
    assert after.store.unprocessed_feedback() == []
    made = [e for e in after.store.examples() if e.kind == "sft" and e.provenance.get("generation")]
    assert len(made) == 3


def test_a_promotion_killed_mid_transaction_leaves_one_champion_the_old_one(tmp_path):
    loop = shop_loop(tmp_path, 3)
    loop.store.add_version(
        id=2,
        name="shop-v2",
        parent_id=1,
        run_dir=str(tmp_path / "runs" / "shop-v2"),
        gguf=None,
        status="candidate",
        example_ids=[],
        metrics={},
    )
    killed_inside(loop.target, "_move_champion")
    after = open_loop(loop.target)
    assert [v.id for v in after.store.versions() if v.status == "champion"] == [1]
    assert after.store.version(2).status == "candidate"
    after.store.promote(2, "test", "again, to the end")
    assert [v.id for v in after.store.versions() if v.status == "champion"] == [2]
