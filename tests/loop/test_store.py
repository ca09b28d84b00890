"""The store on SQLite and PostgreSQL: migrations, idempotent feedback, examples, registry, leases."""

import os
import threading
import time
from datetime import timedelta

import pytest

from tuneship.loop.tables import Example, utcnow
from tuneship.loop.store import StoreError, UnknownGeneration, open_store


def add_generation(store, generation_id="gen-1", answer="Paris.", question="Capital of France?"):
    return store.add_generation(
        id=generation_id,
        model="m",
        version_id=1,
        backend="llamacpp:m",
        messages=[{"role": "user", "content": question}],
        answer=answer,
        finish_reason="stop",
        latency_ms=12.5,
        prompt_tokens=9,
        completion_tokens=3,
    )


def example(example_id, split="train", used_in=()):
    conversation = {
        "system": None,
        "messages": [{"role": "user", "content": example_id}],
        "source": {"file": "x", "line": 1},
    }
    return Example(
        id=example_id,
        kind="sft",
        conversation=conversation,
        provenance={},
        split=split,
        status="accepted",
        used_in=list(used_in),
    )


def test_migrations_create_every_table_and_reopening_keeps_the_data(store, database_url):
    from sqlalchemy import inspect

    tables = set(inspect(store.engine).get_table_names())
    assert {"generations", "feedback", "examples", "versions", "events", "leases", "alembic_version"} <= tables
    add_generation(store)
    store.close()
    again = open_store(database_url)
    assert again.generation("gen-1").answer == "Paris."
    again.close()


def test_the_same_example_twice_in_one_batch_is_stored_once(store):
    first, twin = example("a"), example("a")
    twin.reason = "the second copy"
    assert store.add_examples([first, twin, example("b")]) == 2
    assert [(e.id, e.reason) for e in store.examples()] == [("a", None), ("b", None)]


def test_models_match_the_migrated_schema(store):
    from sqlalchemy import inspect

    from tuneship.loop.tables import Base

    inspector = inspect(store.engine)
    for table in Base.metadata.sorted_tables:
        migrated = {c["name"] for c in inspector.get_columns(table.name)}
        assert migrated == {c.name for c in table.columns}, table.name


def test_sqlite_store_runs_in_wal_mode(tmp_path):
    from sqlalchemy import text

    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    store.close()


def test_unreachable_database_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot open or migrate the loop database"):
        open_store("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_feedback_with_the_same_idempotency_key_counts_once(store):
    add_generation(store)
    first, is_new = store.add_feedback("gen-1", "up", None, None, idempotency_key="retry-1")
    again, is_new_again = store.add_feedback("gen-1", "up", None, None, idempotency_key="retry-1")
    assert is_new and not is_new_again and again.id == first.id
    assert store.feedback_count() == 1


def test_concurrent_retries_with_one_key_store_one_row(store):
    add_generation(store)
    ids = []
    threads = [
        threading.Thread(target=lambda: ids.append(store.add_feedback("gen-1", "down", None, None, "same")[0].id))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and store.feedback_count() == 1


def test_feedback_on_an_unknown_generation_is_refused(store):
    with pytest.raises(UnknownGeneration, match="generation_id: no generation 'gen-nope'"):
        store.add_feedback("gen-nope", "up", None, None)
    assert store.feedback_count() == 0


def test_examples_are_stored_once_per_id_and_filtered_by_use(store):
    assert store.add_examples([example("a"), example("b", used_in=[1]), example("c", split="golden")]) == 3
    assert store.add_examples([example("a")]) == 0
    assert [e.id for e in store.examples(split="train", unused=True)] == ["a"]
    store.mark_used(["a"], 2)
    store.mark_used(["a"], 2)
    assert store.examples(split="train", unused=True) == []
    assert {e.id: e.used_in for e in store.examples(split="train")} == {"a": [2], "b": [1]}


def test_champion_is_the_version_with_that_status(store):
    store.add_version(
        id=1, name="m", parent_id=None, run_dir="/r/m", gguf=None, status="retired", example_ids=[], metrics={}
    )
    store.add_version(
        id=2,
        name="m-v2",
        parent_id=1,
        run_dir="/r/m-v2",
        gguf=None,
        status="champion",
        example_ids=[],
        metrics={"x": 1},
    )
    assert store.champion().id == 2 and store.next_version_id() == 3
    store.add_event("promoted", "api", "won the gate", {"from": 1, "to": 2}, version_id=2)
    [event] = store.events()
    assert (event.kind, event.actor, event.data) == ("promoted", "api", {"from": 1, "to": 2})


def test_a_lease_is_exclusive_until_it_expires(store):
    assert store.acquire_lease("cycle", "worker-a", 0.5, stage="train")
    assert not store.acquire_lease("cycle", "worker-b", 60)
    assert store.lease("cycle").holder == "worker-a"
    time.sleep(0.6)
    assert store.lease("cycle") is None
    assert store.acquire_lease("cycle", "worker-b", 60)
    assert not store.renew_lease("cycle", "worker-a", 60)
    store.release_lease("cycle", "worker-b")
    assert store.lease("cycle") is None


def test_racing_workers_get_the_lease_once(store):
    winners = []
    barrier = threading.Barrier(6)

    def take(name):
        barrier.wait()
        if store.acquire_lease("cycle", name, 60):
            winners.append(name)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1


def test_timestamps_are_naive_utc(store):
    add_generation(store)
    assert abs(store.generation("gen-1").created_at - utcnow()) < timedelta(seconds=30)


def test_models_indexes_and_unique_constraints_match_the_migrated_schema(store):
    from sqlalchemy import UniqueConstraint, inspect

    from tuneship.loop.tables import ONE_CHAMPION, Base

    inspector = inspect(store.engine)
    for table in Base.metadata.sorted_tables:
        migrated = {
            (i["name"], tuple(i["column_names"]), bool(i["unique"]))
            for i in inspector.get_indexes(table.name)
            if not i.get("duplicates_constraint")
        }
        assert migrated == {(i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes}
        migrated_unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(table.name)}
        declared = {tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, UniqueConstraint)}
        assert migrated_unique == declared, table.name
    [champion_index] = [i for i in inspector.get_indexes("versions") if i["name"] == ONE_CHAMPION]
    where = champion_index["dialect_options"].get(f"{store.engine.dialect.name}_where")
    assert "champion" in str(where)  # partial: only the champion row is unique


def test_processes_opening_a_new_database_together_migrate_it_once(database_url):
    """Replicas and a worker started together on a new database: each waits for the other's migration (PostgreSQL:
    an advisory lock; SQLite: the write lock) instead of creating the same tables at once."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = "import sys; from tuneship.loop.store import open_store; print(len(open_store(sys.argv[1]).versions()))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    opening = [
        subprocess.Popen([sys.executable, "-c", code, database_url], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    assert [(p.communicate(timeout=120)[0].strip(), p.returncode) for p in opening] == [("0", 0)] * 4
