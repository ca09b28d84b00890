"""Issue 19 against uvicorn on loopback with llama.cpp answering: promote and rollback alternated 50 times while 8
clients chat never leave the chats without a champion, and the table has exactly one after each step, on SQLite
and PostgreSQL (Done-when 4); a chat whose record cannot be stored is still answered and says so (finding 9)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import text

from tests.loop.conftest import database_url, postgres_server  # noqa: F401
from tests.serve.conftest import serve_loop
from tests.serve.test_routing import add_copy_as_version

CLIENTS = 8
STEPS = 50


def champions(store) -> list[int]:
    with store.engine.connect() as connection:
        return [row.id for row in connection.execute(text("SELECT id FROM versions WHERE status = 'champion'"))]


def chat_until(url: str, stop: threading.Event, answered: Counter, refused: list) -> None:
    from openai import APIStatusError, OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    while not stop.is_set():
        try:
            reply = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Question number 1?"}], max_tokens=2
            )
            answered[reply.tuneship["version"]] += 1
        except APIStatusError as exc:
            refused.append((exc.status_code, str(exc.body)))


def test_promote_and_rollback_alternated_while_clients_chat_always_leave_one_champion(fresh_loop_dir, database_url):  # noqa: F811
    from tuneship.loop.promotion import promote, rollback

    loop, server = serve_loop(fresh_loop_dir, [f"loop.database_url={database_url}"])
    add_copy_as_version(loop)
    stop, answered, refused = threading.Event(), Counter(), []
    with server:
        clients = [threading.Thread(target=chat_until, args=(server.url, stop, answered, refused)) for _ in range(8)]
        for client in clients:
            client.start()
        try:
            for step in range(STEPS):
                if step % 2 == 0:
                    promote(loop, 2, "test", f"step {step}")
                else:
                    rollback(loop, "test", f"step {step}")
                assert champions(loop.store) == [2 if step % 2 == 0 else 1], f"after step {step}"
                stop.wait(0.05)  # chats land between the moves too
        finally:
            stop.set()
            for client in clients:
                client.join()
    assert not [r for r in refused if "no champion" in r[1]], refused
    assert refused == [] and sum(answered.values()) >= CLIENTS, (answered, refused[:5])
    assert champions(loop.store) == [1]  # 50 steps: the last one a rollback


def test_a_chat_whose_record_cannot_be_stored_is_answered_and_says_so(served, client, monkeypatch):
    from sqlalchemy.exc import OperationalError

    loop, _ = served

    def locked(**_fields):
        raise OperationalError("INSERT INTO generations", {}, Exception("database is locked"))

    monkeypatch.setattr(loop.store, "add_generation", locked)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Question number 2?"}], max_tokens=4
    )
    assert reply.choices[0].message.content and reply.tuneship["recorded"] is False
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Question number 2?"}], max_tokens=4, stream=True
        )
    )
    assert chunks[-1].tuneship["recorded"] is False and chunks[-1].choices[0].finish_reason
    monkeypatch.undo()
    stored = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Question number 2?"}], max_tokens=4
    )
    assert stored.tuneship["recorded"] is True and loop.store.generation(stored.id) is not None


def test_a_backend_that_cannot_answer_is_503_without_its_paths(served, client, tmp_path):
    from openai import APIStatusError

    loop, _ = served
    missing = tmp_path / "gone" / "tiny-v3.gguf"
    loop.store.add_version(
        id=3,
        name="tiny-v3",
        parent_id=1,
        run_dir=str(tmp_path / "gone"),
        gguf=str(missing),
        status="rejected",
        example_ids=[],
        metrics={},
    )
    with pytest.raises(APIStatusError) as refused:
        client.chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content": "Hi?"}], max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.response.headers["Retry-After"].isdigit()
    assert "v3" in refused.value.body["message"] and str(tmp_path) not in refused.value.response.text
