"""`tuneship serve` under load: locust (headless, bounded) runs U users for S seconds against a run served on
loopback (a real `tuneship serve` in its own process, llama.cpp in-process). Each user chats (one chat in four
streamed) and rates or corrects the answer with an Idempotency-Key, sending it twice as a retrying client would;
one admin polls GET /v1/loop/status every second meanwhile (benchmarks/serve_load_users.py). Prints the number of
requests, the 5xx (must be 0), the 429 (each must carry Retry-After), the p99 of GET /v1/loop/status, and whether
every accepted feedback is stored once.

Usage: python benchmarks/serve_load.py [RUN_DIR] [--users 50] [--seconds 60] [--retry-at-once]
RUN_DIR: an exported run; by default the tests' tiny model (a 2-layer random Llama) is trained and exported
into a temporary folder first (about a minute). The run is copied, so the server's store is a fresh one.
--retry-at-once: a refused user goes on without waiting the Retry-After it was given.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
USERS_FILE = Path(__file__).with_name("serve_load_users.py")
KEY = "bench-admin-key"


@dataclass
class LoadResult:
    statuses: dict[str, int]
    refused_without_retry_after: int
    status_ms: list[float]
    feedback_accepted: int
    feedback_rows: int
    feedback_stored_once: int
    replays: int
    replays_not_matching: int
    seconds: float

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        """5xx answers, and requests that got no answer at all."""
        return sum(n for s, n in self.statuses.items() if not s.isdigit() or int(s) >= 500)

    @property
    def refused(self) -> int:
        return self.statuses.get("429", 0)

    def status_p99_ms(self) -> float:
        ordered = sorted(self.status_ms)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def build_tiny_run(folder: Path) -> Path:
    """The tests' tiny run (tests/loop_fixtures.py), trained and exported into `folder`."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from tests.conftest import make_tiny_model
    from tests.loop_fixtures import tiny_loop_config
    from tuneship.base_model import resolve_base_model
    from tuneship.config import load_config
    from tuneship.pipeline import run_pipeline

    tokenizer_dir = folder / "tokenizer"
    AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m-instruct")).save_pretrained(tokenizer_dir)
    model_dir = make_tiny_model(str(tokenizer_dir), folder / "tiny-llama")
    cfg = load_config(tiny_loop_config(folder, model_dir))
    summary = run_pipeline(cfg, Console(file=io.StringIO()))
    if summary.failed:
        raise RuntimeError(f"the tiny run failed: {summary.stages}")
    return cfg.run_dir


def copy_run(run_dir: Path, folder: Path) -> Path:
    """A copy of the run in its own runs folder (so its own store), as tests/loop_fixtures.py's fresh_loop_dir."""
    import yaml

    target = folder / "runs" / run_dir.name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["run"]["dir"] = str(target.parent)
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    return target


def start_server(run_dir: Path, port: int) -> subprocess.Popen:
    from benchmarks.feedback_load import start_serve

    return start_serve(run_dir, port, ["serve.trigger_every=0"], KEY, seconds=120)


def run_locust(url: str, model: str, users: int, seconds: int, out: Path, retry_at_once: bool = False) -> None:
    """`users` chatting users and one admin for `seconds`, headless; the tallies land in `out`."""
    command = [sys.executable, "-m", "locust", "-f", str(USERS_FILE), "--headless", "--host", url]
    command += ["--users", str(users + 1), "--spawn-rate", str(users + 1), "--run-time", f"{seconds}s"]
    command += ["--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, "TUNESHIP_BENCH_KEY": KEY, "TUNESHIP_BENCH_MODEL": model, "TUNESHIP_BENCH_OUT": str(out)}
    env["TUNESHIP_BENCH_RETRY_AT_ONCE"] = "1" if retry_at_once else "0"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if not out.is_file():  # locust exits 1 when any request failed; no tally file means it did not run
        raise RuntimeError(f"locust did not run: {done.stderr[-3000:]}")


def check_feedback(store, accepted: dict[str, str]) -> int:
    """How many accepted feedback ids are stored exactly once under their generation."""
    once = 0
    for feedback_id, generation_id in accepted.items():
        once += [row.id for row in store.feedback_for(generation_id)].count(feedback_id) == 1
    return once


def run_load(run_dir: Path, users: int = 50, seconds: int = 60, retry_at_once: bool = False) -> LoadResult:
    """Serve a copy of `run_dir` on loopback and run the locust users against it."""
    from benchmarks.feedback_load import free_port
    from tuneship.loop.registry import open_loop

    with tempfile.TemporaryDirectory(prefix="tuneship-serve-load-") as scratch:
        served = copy_run(run_dir, Path(scratch))
        port = free_port()
        server = start_server(served, port)
        started = time.monotonic()
        try:
            tally_file = Path(scratch) / "tally.json"
            run_locust(f"http://127.0.0.1:{port}", run_dir.name, users, seconds, tally_file, retry_at_once)
        finally:
            server.terminate()
            server.wait(timeout=60)
        elapsed = time.monotonic() - started
        tally = json.loads((Path(scratch) / "tally.json").read_text())
        loop = open_loop(served)
        try:
            rows, once = loop.store.feedback_count(), check_feedback(loop.store, tally["feedback"])
        finally:
            loop.store.close()
    return LoadResult(
        tally["statuses"],
        tally["refused_without_retry_after"],
        tally["status_ms"],
        len(tally["feedback"]),
        rows,
        once,
        tally["replays"],
        tally["replays_not_matching"],
        elapsed,
    )


def report(result: LoadResult, users: int, seconds: int) -> str:
    p99 = result.status_p99_ms()
    lines = [
        f"{users} users chatting and sending feedback for {seconds} s, one admin polling GET /v1/loop/status",
        f"requests              {result.requests} ({result.requests / result.seconds:.1f}/s)",
        f"by status             {json.dumps(dict(sorted(result.statuses.items())))}",
        f"5xx or no answer      {result.server_errors}",
        f"429 refusals          {result.refused} ({result.refused_without_retry_after} without Retry-After)",
        f"GET /v1/loop/status   p99 {p99:.0f} ms over {len(result.status_ms)} polls",
        f"feedback accepted     {result.feedback_accepted}, rows stored {result.feedback_rows}, "
        f"stored once {result.feedback_stored_once}; retries {result.replays}, "
        f"{result.replays_not_matching} not answered with the first id",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--retry-at-once", action="store_true", help="refused users do not wait Retry-After")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneship-tiny-") as scratch:
        run_dir = args.run_dir.resolve() if args.run_dir else build_tiny_run(Path(scratch))
        result = run_load(run_dir, args.users, args.seconds, args.retry_at_once)
    print(report(result, args.users, args.seconds))


if __name__ == "__main__":
    main()
