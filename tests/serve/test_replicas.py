"""Issue 21 with real processes on loopback: two `tuneship serve` replicas and one `tuneship loop worker` on one
PostgreSQL, versions' files in one S3 bucket (moto's server). Feedback through both replicas starts one cycle on
the worker, which publishes the version it concluded; after its promotion (through one replica: the tiny random
model never stops, so the gate rightly rejects it) both replicas answer from it within serve.sync_seconds + 5 s; a
rollback through the other replica reaches both; a file changed in the bucket is refused and the previous champion
keeps serving, with the reason in /v1/loop/status."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.loop.conftest import postgres_server  # noqa: F401
from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401
from tests.servers import s3_endpoint
from tuneship.loop.tables import utcnow

KEY = "replica-test-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
SYNC_SECONDS = 1.0
BUCKET = "versions"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def shared(postgres_server, monkeypatch, tmp_path):  # noqa: F811
    """(PostgreSQL URL with an empty schema, S3 endpoint, boto3 client)."""
    if postgres_server is None:
        pytest.skip("PostgreSQL is not installed (make setup installs it when run as root)")
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_server)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    with s3_endpoint(monkeypatch, tmp_path, [BUCKET]) as (endpoint, client):
        yield postgres_server, endpoint, client


class Processes:
    """Child processes of one test, each logging to its own file; all stopped at the end."""

    def __init__(self, folder: Path, loop_dir: Path, overrides: list[str]):
        self.folder, self.loop_dir, self.overrides = folder, loop_dir, overrides
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "tuneship.cli", *args, str(self.loop_dir)]
        for override in self.overrides:
            command += ["--set", override]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TUNESHIP_API_KEY": KEY, **(env or {})}
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.started.append((process, log))
        return process

    def replica(self, name: str) -> str:
        port = free_port()
        cache = {"TUNESHIP_CACHE": str(self.folder / f"cache-{name}")}  # each downloads the versions' files itself
        self.start(name, "serve", "--port", str(port), env=cache)
        return f"http://127.0.0.1:{port}"

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.started)

    def stop(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_until(condition, what: str, processes: Processes, seconds: float = 240):
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{processes.logs()}"
        time.sleep(0.2)


def answered_by(url: str) -> int | None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Question number 1?"}], "max_tokens": 2}
    response = httpx.post(url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=60)
    return response.json()["tuneship"]["version"] if response.status_code == 200 else None


def correct(url: str, question: str, correction: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 2}
    chat = httpx.post(url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=60).json()
    feedback = {"generation_id": chat["id"], "rating": "down", "correction": correction}
    assert httpx.post(url + "/v1/feedback", json=feedback, headers=ADMIN, timeout=30).status_code == 201


def status(url: str) -> dict:
    return httpx.get(url + "/v1/loop/status", headers=ADMIN, timeout=30).json()


def within_sync_of(moved_at, url: str, version_id: int, processes: Processes) -> float:
    """Seconds from the champion's move (`moved_at`, naive UTC) until `url` answers from `version_id`."""
    wait_until(lambda: answered_by(url) == version_id, f"{url} to answer from v{version_id}", processes, 60)
    return (utcnow() - moved_at).total_seconds()


def test_two_replicas_and_a_worker_follow_one_champion_from_the_bucket(fresh_loop_dir, shared, tmp_path):  # noqa: F811
    from tuneship.loop.store import open_store

    database_url, endpoint, _client = shared
    overrides = [
        f"loop.database_url={database_url}",
        f"loop.artifacts_url=s3://{BUCKET}/tiny",
        f"data.s3.endpoint_url={endpoint}",
        "serve.cycles=external",
        f"serve.sync_seconds={SYNC_SECONDS}",
        "loop.min_examples=2",
        "loop.fast_path=false",
    ]
    processes = Processes(tmp_path, fresh_loop_dir, overrides)
    try:
        processes.start("worker", "loop", "worker", "--every", "1")
        first, second = processes.replica("a"), processes.replica("b")
        for url in (first, second):
            wait_until(lambda url=url: answered_by(url) == 1, f"{url} to serve v1", processes)
        store = open_store(database_url)

        correct(first, "What is the code word?", "Answer number 99.")
        correct(second, "Who keeps it?", "Answer number 98.")
        concluded = wait_until(
            lambda: (v2 := store.version(2)) is not None and v2.status in ("rejected", "champion") and v2,
            "the worker to conclude v2",
            processes,
        )
        assert "gguf" in concluded.artifacts and "adapter" in concluded.artifacts  # published for the replicas
        cycles = store.events(kind="cycle_started")
        assert len(cycles) == 1 and cycles[0].actor.startswith("worker ")

        promoted = httpx.post(first + "/v1/versions/2/promote", headers=ADMIN, timeout=30)
        assert promoted.status_code == 200, promoted.text
        promoted_at = store.champion().promoted_at
        for url in (first, second):
            assert within_sync_of(promoted_at, url, 2, processes) < SYNC_SECONDS + 5
        assert any((tmp_path / "cache-a" / "artifacts" / "blobs").rglob("*.gguf"))  # served from its own copy

        rollback = httpx.post(second + "/v1/rollback", headers=ADMIN, timeout=30)
        assert rollback.status_code == 200, rollback.text
        rolled_at = utcnow()
        for url in (first, second):
            assert within_sync_of(rolled_at, url, 1, processes) < SYNC_SECONDS + 5

        replicas = wait_until(
            lambda: [r for r in status(first)["replicas"] if r["version"] == 1 and r["seconds_ago"] < 10],
            "both replicas to report v1",
            processes,
            30,
        )
        assert sorted(r["url"] for r in replicas) == sorted([first, second])
        assert all(r["problem"] is None for r in replicas)
        store.close()
    finally:
        processes.stop()


def test_a_replica_refuses_a_changed_file_and_keeps_the_previous_champion(fresh_loop_dir, shared, tmp_path):  # noqa: F811
    from tuneship.loop.artifacts import publish_artifacts
    from tuneship.loop.promotion import promote
    from tuneship.loop.registry import open_loop
    from tests.serve.test_routing import add_copy_as_version

    database_url, endpoint, client = shared
    overrides = [
        f"loop.database_url={database_url}",
        f"loop.artifacts_url=s3://{BUCKET}/tiny",
        f"data.s3.endpoint_url={endpoint}",
        "serve.cycles=external",
        f"serve.sync_seconds={SYNC_SECONDS}",
    ]
    loop = open_loop(fresh_loop_dir, overrides)
    publish_artifacts(loop, loop.store.champion())
    processes = Processes(tmp_path, fresh_loop_dir, overrides)
    try:
        url = processes.replica("a")
        wait_until(lambda: answered_by(url) == 1, "the replica to serve v1", processes)

        v2 = add_copy_as_version(loop)
        Path(v2.gguf).write_bytes(Path(v2.gguf).read_bytes() + b"\0")  # its own GGUF: another blob
        v2 = publish_artifacts(loop, v2)
        key = v2.artifacts["gguf"]["key"]
        body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[100] ^= 0x01
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
        promote(loop, 2, "test", "a corrupted upload")

        problem = wait_until(
            lambda: next((r["problem"] for r in status(url)["replicas"] if r["problem"]), None),
            "the replica to report the refused file",
            processes,
            30,
        )
        assert "v2 not served" in problem and "sha256" in problem
        assert answered_by(url) == 1
        assert [r["version"] for r in status(url)["replicas"]] == [1]
    finally:
        processes.stop()
