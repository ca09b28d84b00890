"""How long each web page of `tuneship serve` takes to render, server side, on a real run.

Usage: python benchmarks/web_render.py RUN_DIR [--requests 20] [--feedback 30]
RUN_DIR is an evaluated and exported run (e.g. runs/quickstart after `make demo`). The loop is opened over it
with a throwaway store (a temporary SQLite file, never the one beside the run), seeded the way a loop in use
would be: --feedback generations of the run's eval prompts, each corrected and waiting for review
(`loop.review: required`). Each page is requested once to warm up, then --requests times through the app
in-process (template, store reads and run files included; no network). Prints median and p95 milliseconds per
page; the target (issue 10) is under 300 ms for every page on the quickstart run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

PAGES = ["/", "/playground", "/review", "/versions", "/loop"]
TARGET_MS = 300


def seed_feedback(loop, run_dir: Path, count: int) -> int:
    """`count` generations of the run's eval prompts, each with a correction; harvested into pending examples."""
    from tuneship.loop.signals import harvest

    prompts = json.loads((run_dir / "reports" / "eval.json").read_text(encoding="utf-8"))["prompts"]
    for index in range(count):
        question = prompts[index % len(prompts)]["question"]
        generation = loop.store.add_generation(
            id=f"bench-{index}",
            model=loop.name,
            version_id=1,
            backend="benchmark",
            messages=[{"role": "user", "content": f"{question} ({index})"}],
            answer="an answer to correct",
            finish_reason="stop",
            latency_ms=1.0,
            prompt_tokens=None,
            completion_tokens=None,
        )
        loop.store.add_feedback(generation.id, "down", None, None)
        loop.store.add_feedback(generation.id, None, f"The corrected answer {index}.", None)
    return sum(harvest(loop.store, loop.cfg).examples.values())


def time_pages(client, requests: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {}
    for page in PAGES:
        assert client.get(page).status_code == 200, page
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get(page)
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (page, response.status_code)
        timings[page] = samples
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--feedback", type=int, default=30)
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import create_app

    with tempfile.TemporaryDirectory() as scratch:
        overrides = [f"loop.database_url=sqlite:///{scratch}/bench.db", "loop.review=required"]
        loop = open_loop(args.run_dir.resolve(), overrides)
        examples = seed_feedback(loop, args.run_dir, args.feedback)
        with TestClient(create_app(loop)) as client:
            timings = time_pages(client, args.requests)
        loop.store.close()
    print(f"run {args.run_dir} ; store seeded with {args.feedback} corrected generations ({examples} examples)")
    print(f"{'page':<12} {'median ms':>10} {'p95 ms':>8}  target < {TARGET_MS} ms")
    for page, samples in timings.items():
        p95 = sorted(samples)[max(0, round(0.95 * len(samples)) - 1)]
        verdict = "ok" if p95 < TARGET_MS else "SLOW"
        print(f"{page:<12} {statistics.median(samples):>10.1f} {p95:>8.1f}  {verdict}")


if __name__ == "__main__":
    main()
