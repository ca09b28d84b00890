"""`kill -9` of the cycle process (or of a `tuneship loop worker`) mid-training: the lease expires, the next
cycle (or worker) resumes the same version from its last checkpoint, and no example is lost or counted twice."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from tests.conftest import REPO
from tests.loop.test_cycle import correct
from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401
from tuneship.loop.examples import waiting_examples

OVERRIDES = ["train.max_steps=24", "train.save_steps=2", "loop.lease_seconds=3"]


def wait_for(condition, what: str, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_killed_cycle_loses_its_lease_and_the_next_one_resumes_without_losing_examples(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.registry import open_loop
    from tuneship.loop.cycle import run_cycle

    loop = open_loop(fresh_loop_dir, OVERRIDES)
    correct(loop, [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")])
    kill_mid_training(loop, fresh_loop_dir, ["loop", "cycle"])

    output = io.StringIO()
    result = run_cycle(open_loop(fresh_loop_dir, OVERRIDES), Console(file=output, width=200), "test", "again")

    assert result.version_id == 2 and result.status == "rejected" and "resuming from" in output.getvalue()
    assert_resumed_without_loss(loop)


def test_a_killed_worker_s_version_is_resumed_by_the_next_worker(fresh_loop_dir):  # noqa: F811
    """Workers that take over each other's cycles share the runs folder (the checkpoints are there)."""
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir, OVERRIDES)
    correct(loop, [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")])
    kill_mid_training(loop, fresh_loop_dir, ["loop", "worker", "--every", "0.5"])

    second = subprocess.run(
        tuneship("loop", "worker", "--every", "0.5", "--cycles", "1", target=fresh_loop_dir),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "resume v2, left in training" in second.stdout, second.stdout + second.stderr
    assert "resuming from" in second.stdout
    assert_resumed_without_loss(loop)


def tuneship(*args: str, target: Path) -> list[str]:
    command = [sys.executable, "-m", "tuneship.cli", *args, str(target)]
    for override in OVERRIDES:
        command += ["--set", override]
    return command


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "200"}


def kill_mid_training(loop, loop_dir: Path, args: list[str]) -> None:
    """Start `tuneship <args> <loop_dir>`, kill -9 it once v2 has a checkpoint, and wait for its lease to expire."""
    worker = subprocess.Popen(
        tuneship(*args, target=loop_dir), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = loop_dir.parent / "tiny-v2" / "checkpoints"
    try:
        wait_for(lambda: any(checkpoints.glob("checkpoint-*/trainer_state.json")), "a checkpoint")
        lease = loop.store.lease("cycle")
        assert lease is not None and lease.stage == "train" and lease.version_id == 2
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert loop.store.version(2).status == "training"
    wait_for(lambda: loop.store.lease("cycle") is None, "the dead worker's lease to expire", seconds=10)


def assert_resumed_without_loss(loop) -> None:
    assert [v.id for v in loop.store.versions()] == [1, 2]
    experiment = json.loads((Path(loop.store.version(2).run_dir) / "reports" / "experiment.json").read_text())
    assert experiment["resumed_from"] and experiment["steps"] == 24, experiment["status"]
    new = [e for e in loop.store.examples() if e.kind == "sft" and e.provenance.get("generation")]
    assert sorted(e.conversation["messages"][-1]["content"] for e in new) == ["Answer number 98.", "Answer number 99."]
    # the tiny random model learns nothing: v2 is rejected and its examples wait for the next cycle (used only when
    # a version that trained on them is promoted): none lost, none counted twice
    assert loop.store.version(2).status == "rejected"
    assert [(e.used_in, e.status) for e in new] == [([], "accepted"), ([], "accepted")]
    assert {e.id for e in waiting_examples(loop.store)} == {e.id for e in new}
    assert len(loop.store.examples()) == len({e.id for e in loop.store.examples()})
    assert [e.kind for e in loop.store.events(kind="cycle_resumed")] == ["cycle_resumed"]
