"""Feedback under load: N POST /v1/feedback from C concurrent clients against `tuneship serve` (a real uvicorn
in its own process) on SQLite and on PostgreSQL, and against two replicas on one PostgreSQL (client k posts to
replica k % 2, and every tenth post is sent again, same Idempotency-Key, to the other replica: it must count once);
prints requests/s, p50/p99 latency, errors, rows stored and rows stored twice.

Usage: python benchmarks/feedback_load.py [N=1000] [C=50]
PostgreSQL comes from tests/postgres.py (a throwaway server on loopback); without it those rows are skipped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class LoadResult:
    requests: int
    error_kinds: Counter  # "HTTP 503", "replayed False, expected True", "ReadTimeout"...: how many of each
    rows: int
    seconds: float
    latencies_ms: list[float]
    duplicated: int = 0  # rows beyond one per Idempotency-Key
    retries: int = 0  # posts sent again to the other replica

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


BENCH_KEY = "bench"
ADMIN = {"Authorization": f"Bearer {BENCH_KEY}"}  # the admin key: status needs it, and feedback is not limited


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(
    target: Path, port: int, overrides: list[str], key: str = BENCH_KEY, seconds: float = 60
) -> subprocess.Popen:
    """`tuneship serve TARGET` on loopback with `key` as the admin key, returned once its status answers."""
    command = [sys.executable, "-m", "tuneship.cli", "serve", str(target), "--port", str(port)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TUNESHIP_API_KEY": key}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds
    probe = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/loop/status", headers={"Authorization": f"Bearer {key}"}
    )
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(probe, timeout=5).read()
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"tuneship serve exited: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"tuneship serve did not start within {seconds:g} s")


def start_server(config: Path, database_url: str, port: int) -> subprocess.Popen:
    return start_serve(config, port, [f"loop.database_url={database_url}", "serve.trigger_every=0"])


def seed_generations(store, count: int) -> list[str]:
    ids = [f"chatcmpl-bench-{i}" for i in range(count)]
    for generation_id in ids:
        store.add_generation(
            id=generation_id,
            model="bench",
            version_id=1,
            backend="bench",
            messages=[{"role": "user", "content": f"question {generation_id}"}],
            answer="an answer",
            finish_reason="stop",
            latency_ms=1.0,
            prompt_tokens=5,
            completion_tokens=3,
        )
    return ids


async def post_feedback(urls: list[str], generation_ids: list[str], total: int, concurrency: int):
    """(latencies, error kinds, seconds, retries): client k posts to urls[k % len(urls)]; with several urls every tenth
    post is retried on the next one with the same key (a client whose first answer got lost), which must replay."""
    import httpx

    # A connection idle for as long as uvicorn keeps one (5 s) may be closed by the server just as the client sends
    # on it: a ReadError that is the client's, not the server's (seen under a loaded CPU on the retry connections,
    # which idle between every tenth post). The client lets its idle connections go first, as a client should.
    idle_limits = httpx.Limits(keepalive_expiry=2.0)
    latencies: list[float] = []
    errors: Counter = Counter()
    retries = 0
    queue: asyncio.Queue = asyncio.Queue()
    for index in range(total):
        queue.put_nowait(index)

    async def post(client, body: dict, key: str, replayed: bool) -> None:
        started = time.perf_counter()
        try:
            response = await client.post("/v1/feedback", json=body, headers={"Idempotency-Key": key})
            if response.status_code != 201:
                errors[f"HTTP {response.status_code}: {response.text[:200]}"] += 1
            elif response.json()["replayed"] != replayed:
                errors[f"replayed {not replayed}, expected {replayed}"] += 1
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
        latencies.append((time.perf_counter() - started) * 1000)

    async def client_loop(number: int):
        nonlocal retries
        mine, other = urls[number % len(urls)], urls[(number + 1) % len(urls)]
        async with (
            httpx.AsyncClient(base_url=mine, headers=ADMIN, timeout=60, limits=idle_limits) as client,
            httpx.AsyncClient(base_url=other, headers=ADMIN, timeout=60, limits=idle_limits) as retry_client,
        ):
            while not queue.empty():
                index = queue.get_nowait()
                body = {"generation_id": generation_ids[index % len(generation_ids)], "rating": 1 + index % 5}
                await post(client, body, f"bench-{index}", replayed=False)
                if len(urls) > 1 and index % 10 == 0:
                    retries += 1
                    await post(retry_client, body, f"bench-{index}", replayed=True)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(number) for number in range(concurrency)))
    return latencies, errors, time.perf_counter() - started, retries


def run_load(database_url: str, total: int, concurrency: int, replicas: int = 1) -> LoadResult:
    """Start `replicas` `tuneship serve` processes on `database_url`, post `total` feedback from `concurrency`
    clients across them."""
    from tuneship.loop.store import open_store

    folder = Path(tempfile.mkdtemp(prefix="tuneship-load-"))
    config = folder / "bench.yaml"
    config.write_text(f"run: {{name: bench, dir: {folder / 'runs'}}}\n")
    store = open_store(database_url)
    generation_ids = seed_generations(store, 100)
    ports = [free_port() for _ in range(replicas)]
    servers = []
    try:
        servers = [start_server(config, database_url, port) for port in ports]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        latencies, errors, seconds, retries = asyncio.run(post_feedback(urls, generation_ids, total, concurrency))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    rows = store.feedback_count()
    duplicated = rows - distinct_keys(store)
    store.close()
    return LoadResult(total, errors, rows, seconds, latencies, duplicated, retries)


def distinct_keys(store) -> int:
    """Distinct (client, Idempotency-Key) pairs among the stored feedback."""
    from sqlalchemy import func, select

    from tuneship.loop.tables import Feedback

    pairs = select(Feedback.client, Feedback.idempotency_key).distinct().subquery()
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(pairs)) or 0


def main() -> None:
    from tests.postgres import postgres_url

    total = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    print(f"{total} POST /v1/feedback from {concurrency} concurrent clients, tuneship serve on loopback")
    print(f"{'database':<26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'rows':>8}{'twice':>7}")
    with tempfile.TemporaryDirectory() as folder, postgres_url() as pg_url:
        rows = (("sqlite", f"sqlite:///{folder}/bench.db", 1), ("postgresql", pg_url, 1))
        for name, url, replicas in (*rows, ("postgresql, 2 replicas", pg_url, 2)):
            if url is None:
                print(f"{name:<26}skipped: PostgreSQL not installed")
                continue
            if replicas > 1:
                empty_schema(url)
            result = run_load(url, total, concurrency, replicas)
            print(
                f"{name:<26}{result.per_second:>10.1f}{result.percentile(0.5):>10.1f}"
                f"{result.percentile(0.99):>10.1f}{result.errors:>8}{result.rows:>8}{result.duplicated:>7}"
                + (f"  ({result.retries} retried on the other replica)" if result.retries else "")
            )


def empty_schema(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


if __name__ == "__main__":
    main()
