"""Issue 19, findings 7, 8 and 11, on SQLite and PostgreSQL: the champion moves in one transaction (never none,
never two), promote/rollback/a cycle's conclusion are ordered, a rollback restores only what can serve, the smoke
test asks for the promoted version, a failure after a promotion keeps it, the heartbeat outlives a database
error; a harvest stores its examples and marks its feedback in one transaction; racing inserts store once;
an Idempotency-Key is the client's and bound to the request; the loop status counts in SQL."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.loop.test_store import add_generation, example
from tests.servers import LoopbackServer
from tuneship.config import Config
from tuneship.loop.tables import Example


def champions(store) -> list[int]:
    with store.engine.connect() as connection:
        return [row.id for row in connection.execute(text("SELECT id FROM versions WHERE status = 'champion'"))]


def servable_run(folder: Path) -> tuple[str, str]:
    """(run_dir, gguf): what `require_servable` looks for, as empty files."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "chat_format.json").write_text("{}")
    (folder / "model.gguf").write_bytes(b"GGUF")
    return str(folder), str(folder / "model.gguf")


@pytest.fixture
def loop(database_url, tmp_path):
    """A loop over a config (v1 registered, champion) whose versions have GGUF and adapter files to point at."""
    from tuneship.loop.registry import open_loop

    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nloop: {{database_url: '{database_url}'}}\n")
    loop = open_loop(config)
    run_dir, gguf = servable_run(tmp_path / "runs" / "shop")
    loop.store.update_version(1, run_dir=run_dir, gguf=gguf)
    yield loop
    loop.store.close()


def add_version(loop, version_id: int, parent: int = 1, status: str = "candidate", **metrics):
    run_dir, gguf = servable_run(Path(loop.cfg.run.dir) / f"shop-v{version_id}")
    return loop.store.add_version(
        id=version_id,
        name=f"shop-v{version_id}",
        parent_id=parent,
        run_dir=run_dir,
        gguf=gguf,
        status=status,
        example_ids=[],
        metrics={"new_examples": [], "replay_examples": [], **metrics},
    )


# one champion ---------------------------------------------------------------------------------


def test_the_database_refuses_a_second_champion(store):
    from sqlalchemy.exc import IntegrityError

    fields = {"parent_id": None, "run_dir": "/r", "gguf": None, "example_ids": [], "metrics": {}}
    store.add_version(id=1, name="m", status="champion", **fields)
    store.add_version(id=2, name="m-v2", status="candidate", **fields)
    with pytest.raises(IntegrityError):
        store.update_version(2, status="champion")
    with pytest.raises(IntegrityError):
        store.add_version(id=3, name="m-v3", status="champion", **fields)
    assert champions(store) == [1]


def test_a_database_a_race_left_with_two_champions_keeps_the_latest_promoted(database_url):
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import create_engine

    from tuneship.loop.store import MIGRATIONS, open_store

    engine = create_engine(database_url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        insert = text(
            "INSERT INTO versions (id, created_at, name, run_dir, status, example_ids, metrics, promoted_at, kind, "
            "shots) VALUES (:id, :at, :name, '/r', 'champion', '[]', '{}', :at, 'finetune', '[]')"
        )
        connection.execute(insert, {"id": 1, "name": "m", "at": "2024-01-02 00:00:00"})
        connection.execute(insert, {"id": 2, "name": "m-v2", "at": "2024-01-01 00:00:00"})
        connection.execute(
            text(
                "INSERT INTO generations (id, created_at, model, backend, messages, answer, finish_reason, "
                "latency_ms) VALUES ('gen-1', '2024-01-01 00:00:00', 'm', 'b', '[]', 'Paris.', 'stop', 1.0)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO feedback (id, created_at, generation_id, rating, idempotency_key, source) VALUES "
                "('fb-1', '2024-01-01 00:00:00', 'gen-1', 'up', 'key-1', 'api')"
            )
        )
    engine.dispose()
    store = open_store(database_url)
    assert champions(store) == [1] and store.version(2).status == "retired"
    [kept] = store.feedback_for("gen-1")
    assert (kept.id, kept.client, kept.idempotency_key, kept.request_hash) == ("fb-1", "anonymous", "key-1", None)
    assert store.add_feedback("gen-1", "up", None, None, "key-1")[0].id == "fb-1"  # an old key still replays
    assert store.add_feedback("gen-1", "down", None, None, "key-1", client="app")[1]  # another client's own key
    store.close()


def test_concurrent_promotions_are_ordered_one_after_another(loop):
    from tuneship.loop.promotion import promote

    for version_id in range(2, 10):
        add_version(loop, version_id)
    barrier = threading.Barrier(8)
    errors = []

    def run(version_id: int) -> None:
        barrier.wait()
        try:
            promote(loop, version_id, "test", "race")
        except Exception as exc:  # noqa: BLE001 (collected, asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(version_id,)) for version_id in range(2, 10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(champions(loop.store)) == 1
    chain = [e.data for e in reversed(loop.store.events(kind="promoted"))]
    assert len(chain) == 8 and chain[0]["from"] == 1 and chain[-1]["to"] == champions(loop.store)[0]
    assert all(later["from"] == earlier["to"] for earlier, later in zip(chain, chain[1:]))  # each saw the last
    assert sorted(v.status for v in loop.store.versions()) == ["champion"] + ["retired"] * 8


def test_readers_never_see_no_champion_while_promote_and_rollback_alternate(loop):
    from tuneship.loop.promotion import promote, rollback

    add_version(loop, 2)
    seen = {"none": 0, "reads": 0}
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen["none"] += loop.store.champion() is None
            seen["reads"] += 1

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(25):
            promote(loop, 2, "test", "up")
            assert champions(loop.store) == [2]
            rollback(loop, "test", "down")
            assert champions(loop.store) == [1]
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert seen["none"] == 0 and seen["reads"] > 0


def test_champion_is_deterministic(loop):
    add_version(loop, 2)
    assert [loop.store.champion().id for _ in range(5)] == [1] * 5


# rollback and the cycle's conclusion ------------------------------------------------------------


def test_rollback_refuses_a_previous_version_whose_files_are_gone(loop):
    from tuneship.loop.promotion import promote, rollback
    from tuneship.loop.registry import RegistryError

    add_version(loop, 2)
    promote(loop, 2, "test", "better")
    Path(loop.store.version(1).gguf).unlink()
    with pytest.raises(RegistryError, match="v1 .* has no exported GGUF"):
        rollback(loop, "test", "worse")
    assert champions(loop.store) == [2] and loop.store.version(1).status == "retired"
    assert loop.store.events(kind="rolled_back") == []


def test_a_cycle_whose_parent_was_rolled_back_ends_stale_and_the_rollback_stands(loop):
    from tuneship.loop.cycle import conclude
    from tuneship.loop.gate import GateDecision
    from tuneship.loop.lease import Heartbeat
    from tuneship.loop.promotion import promote, rollback

    loop.store.add_examples([example("new-1")])
    add_version(loop, 2)
    promote(loop, 2, "test", "v2 won")
    challenger = add_version(loop, 3, parent=2, new_examples=["new-1"])  # a cycle started from v2 ...
    rollback(loop, "admin", "v2 is bad")  # ... and v2 was rolled back while it trained
    result = conclude(loop, Heartbeat(loop.store, "h", 30), challenger, GateDecision(True, ["better"]), "test", None)
    assert result.status == "stale" and "v3 was made from v2, which is no longer the champion (v1)" in result.reasons[0]
    assert champions(loop.store) == [1] and loop.store.version(3).status == "rejected"
    [finished] = loop.store.events(kind="cycle_finished")
    assert finished.reason.startswith("stale: ") and finished.data == {"stale": True}
    assert loop.store.examples(unused=True)[0].id == "new-1"  # not marked used: it waits for the next cycle


def test_a_stale_batch_is_due_again_at_once(loop):
    from tuneship.loop.trigger import finetune_due

    loop.store.add_examples([example(f"new-{i}") for i in range(3)])
    add_version(loop, 2, status="rejected", stale="v1 moved")
    loop.store.update_version(2, metrics={"new_examples": ["new-0", "new-1", "new-2"], "stale": "v1 moved"})
    due, _ = finetune_due(loop.store, loop.cfg.loop.model_copy(update={"min_examples": 3}))
    assert due == "3 new examples (threshold 3)"


def test_a_failure_after_the_promotion_leaves_the_promoted_version_champion(loop, monkeypatch):
    from rich.console import Console

    import tuneship.loop.cycle as cycle
    from tuneship.loop.promotion import promote

    add_version(loop, 2)

    def promotes_then_breaks(loop, console, heartbeat, actor, reason, live_url, train_processes=None):
        heartbeat.stage("promote", 2)
        promote(loop, 2, actor, "won the gate")
        raise RuntimeError("the smoke test broke")

    monkeypatch.setattr(cycle, "finetune_cycle", promotes_then_breaks)
    with pytest.raises(RuntimeError, match="smoke test broke"):
        cycle.run_cycle(loop, Console(quiet=True))
    assert champions(loop.store) == [2] and loop.store.version(2).status == "champion"
    assert loop.store.events(kind="cycle_failed")[0].reason == "RuntimeError: the smoke test broke"


class _LiveChat(BaseHTTPRequestHandler):
    asked: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _LiveChat.asked.append(body["model"])
        version = int(body["model"].rsplit("-v", 1)[1]) if "-v" in body["model"] else 1
        reply = {
            "choices": [{"message": {"content": "Paris."}, "finish_reason": "stop"}],
            "tuneship": {"version": version},
        }
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_the_smoke_test_asks_for_the_promoted_version_by_its_own_name(loop):
    from tuneship.loop.promotion import promote, smoke_problems

    golden = example("golden-1", split="golden")
    golden.conversation = {**golden.conversation, "messages": [*golden.conversation["messages"], _answer("Paris.")]}
    loop.store.add_examples([golden])
    add_version(loop, 2)
    promote(loop, 2, "test", "won")
    _LiveChat.asked = []
    with LoopbackServer(_LiveChat) as server:
        assert smoke_problems(loop, 2, server.url) == []
    assert _LiveChat.asked == ["shop-v2"]


def _answer(text_: str) -> dict:
    return {"role": "assistant", "content": text_}


def test_the_lease_heartbeat_outlives_a_database_error(store):
    from sqlalchemy.exc import OperationalError

    from tuneship.loop.lease import CYCLE_LEASE, Heartbeat

    class Flaky:
        """The store, whose first two renewals fail as a locked database does."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def renew_lease(self, *args, **fields):
            self.calls += 1
            if self.calls <= 2:
                raise OperationalError("UPDATE leases", {}, Exception("database is locked"))
            return self.inner.renew_lease(*args, **fields)

    assert store.acquire_lease(CYCLE_LEASE, "me", 0.6)
    flaky = Flaky(store)
    heartbeat = Heartbeat(flaky, "me", 0.6)
    heartbeat.start()
    time.sleep(1.0)
    try:
        assert heartbeat.is_alive() and flaky.calls >= 3
        assert store.lease(CYCLE_LEASE) is not None  # renewed after the errors
    finally:
        heartbeat.stopped.set()
        heartbeat.join()


# nothing lost -----------------------------------------------------------------------------------


def _fail_example_inserts(store) -> None:
    statements = {
        "sqlite": ["CREATE TRIGGER no_examples BEFORE INSERT ON examples BEGIN SELECT RAISE(ABORT, 'disk full'); END"],
        "postgresql": [
            "CREATE FUNCTION no_examples() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ "
            "LANGUAGE plpgsql",
            "CREATE TRIGGER no_examples BEFORE INSERT ON examples FOR EACH ROW EXECUTE FUNCTION no_examples()",
        ],
    }[store.engine.dialect.name]
    with store.engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def test_a_harvest_that_cannot_store_its_examples_leaves_the_feedback_unprocessed(store):
    from sqlalchemy.exc import SQLAlchemyError

    from tuneship.loop.signals import harvest

    add_generation(store, answer="Lyon.")
    store.add_feedback("gen-1", "down", "Paris.", None)
    _fail_example_inserts(store)
    with pytest.raises(SQLAlchemyError, match="disk full"):
        harvest(store, Config())
    assert [f.outcome for f in store.feedback_for("gen-1")] == [None] and store.examples() == []
    with store.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER no_examples" + (" ON examples" if _is_pg(store) else "")))
    result = harvest(store, Config())  # the next harvest makes them
    assert result.examples["sft"] == 1 and store.feedback_for("gen-1")[0].outcome.startswith("examples: ")


def _is_pg(store) -> bool:
    return store.engine.dialect.name == "postgresql"


def test_racing_writers_store_each_example_once(store):
    batch = [example(f"ex-{i}") for i in range(40)]
    barrier = threading.Barrier(6)
    added, errors = [], []

    def write() -> None:
        barrier.wait()
        try:
            added.append(store.add_examples([Example(**_fields(e)) for e in batch]))
        except Exception as exc:  # noqa: BLE001 (collected, asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sum(added) == 40 and store.count_examples() == 40


def _fields(example_: Example) -> dict:
    return {c.key: getattr(example_, c.key) for c in Example.__table__.columns}


def test_a_locked_store_gives_up_within_its_timeout(store, database_url):
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    add_generation(store)
    store.use_timeout(1)  # serve.db_timeout while serving
    holder = create_engine(database_url)  # another process holding the write lock (a cycle, a migration)
    with holder.connect() as connection:
        if _is_pg(store):
            connection.execute(text("BEGIN"))
            connection.execute(text("LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE"))
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(OperationalError):
            store.add_feedback("gen-1", "up", None, None)
        waited = time.monotonic() - started
        connection.rollback()
    holder.dispose()
    assert 0.5 < waited < 4, f"gave up after {waited:.1f} s with a 1 s timeout"
    assert store.add_feedback("gen-1", "up", None, None)[1]  # free again: stored


# idempotency ------------------------------------------------------------------------------------


def test_an_idempotency_key_is_the_clients_own_and_bound_to_the_request(store):
    from tuneship.loop.store import IdempotencyConflict

    add_generation(store)
    add_generation(store, "gen-2")
    first, is_new = store.add_feedback("gen-1", "up", None, None, "key-1", client="app-a")
    again, is_new_again = store.add_feedback("gen-1", "up", None, None, "key-1", client="app-a")
    assert is_new and not is_new_again and again.id == first.id
    with pytest.raises(IdempotencyConflict, match="Idempotency-Key 'key-1': already used for another request"):
        store.add_feedback("gen-1", "down", None, None, "key-1", client="app-a")
    with pytest.raises(IdempotencyConflict):
        store.add_feedback("gen-2", "up", None, None, "key-1", client="app-a")
    other, is_new_other = store.add_feedback("gen-2", "down", None, None, "key-1", client="app-b")
    assert is_new_other and other.client == "app-b" and store.feedback_count() == 2


# status -----------------------------------------------------------------------------------------


def test_loop_status_counts_in_the_database_instead_of_loading_every_example(loop, monkeypatch):
    from tuneship.loop.status import status_report

    replayed = [example(f"old-{i}", used_in=[1]) for i in range(300)]
    golden = [example(f"golden-{i}", split="golden") for i in range(7)]
    loop.store.add_examples([*replayed, *golden, example("new-1"), example("new-2")])
    loaded = []
    examples = loop.store.examples
    monkeypatch.setattr(loop.store, "examples", lambda *a, **k: loaded.append(len(rows := examples(*a, **k))) or rows)
    report = status_report(loop)
    assert report["examples_waiting"] == 2 and report["examples_pending_review"] == 0
    assert max(loaded, default=0) <= 2  # only the waiting rows, never the 300 trained ones


def test_counting_matches_listing(store):
    store.add_examples([example("a"), example("b", used_in=[1]), example("c", split="golden")])
    for filters in ({}, {"unused": True}, {"unused": False}, {"split": "golden"}, {"kind": "dpo"}):
        assert store.count_examples(**filters) == len(store.examples(**filters)), filters
