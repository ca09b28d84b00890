"""Promotion swaps the served GGUF without dropping requests in flight; routes fall through to fallbacks;
the Ollama backend serves `name:v<N>` and promotion moves `name:latest`."""

import shutil

import pytest

from tests.deploy.fake_ollama import FakeOllama
from tests.serve.conftest import serve_loop


def add_copy_as_version(loop, version_id=2, status="candidate"):
    """A second version: a copy of the base run (the same GGUF under another run directory)."""
    base = loop.store.version(1)
    run_dir = loop.base_run.parent / f"tiny-v{version_id}"
    shutil.copytree(loop.base_run, run_dir)
    return loop.store.add_version(
        id=version_id,
        name=f"tiny-v{version_id}",
        parent_id=1,
        run_dir=str(run_dir),
        gguf=base.gguf.replace(str(loop.base_run), str(run_dir)),
        status=status,
        example_ids=[],
        metrics={},
    )


def ask(url, model="tiny", question="Question number 1?"):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=4)


def test_a_request_in_flight_keeps_its_model_through_a_promotion(fresh_loop_dir):
    from tuneship.loop.promotion import promote
    from tuneship.loop.registry import open_loop
    from tuneship.serve.backends import ModelPool, Reply

    loop = open_loop(fresh_loop_dir)
    add_copy_as_version(loop)
    pool = ModelPool(512)
    v1 = loop.store.version(1)
    pool.keep_only({1})
    with pool.use(v1) as model:
        promote(loop, 2, "test", "promoted while a request runs")
        pool.keep_only({2})
        assert 1 in pool.models
        reply = Reply("", "stop", None, None)
        list(model.stream([{"role": "user", "content": "Question number 2?"}], 4, 0.0, reply))
        assert reply.completion_tokens is not None
    assert 1 not in pool.models
    pool.close()


def test_after_a_promotion_the_live_endpoint_answers_with_the_new_champion(fresh_loop_dir):
    from tuneship.loop.promotion import promote, rollback

    loop, server = serve_loop(fresh_loop_dir)
    add_copy_as_version(loop)
    with server:
        assert ask(server.url).tuneship["version"] == 1
        promote(loop, 2, "test", "better")
        assert ask(server.url).tuneship["version"] == 2
        assert ask(server.url, model="tiny").model == "tiny-v2"
        assert ask(server.url, model="tiny").tuneship["version"] == 2
        rollback(loop, "test", "worse after all")
        assert ask(server.url).tuneship["version"] == 1
        assert ask(server.url, model="tiny-v2").tuneship["version"] == 2  # a version by name, not the alias
    assert [v.status for v in loop.store.versions()] == ["champion", "rejected"]


def test_a_failing_primary_falls_through_to_the_fallback_and_the_reply_says_so(fresh_loop_dir, tmp_path):
    with FakeOllama(tmp_path) as ollama:
        overrides = [
            f"deploy.host={ollama.url}",
            'serve.routes={"assistant": {"primary": "ollama:not-there", "fallbacks": ["champion"]}}',
        ]
        loop, server = serve_loop(fresh_loop_dir, overrides)
        with server:
            reply = ask(server.url, model="assistant")
    assert reply.tuneship["tried"] == ["ollama:not-there", "champion"]
    assert reply.model == "tiny" and reply.tuneship["version"] == 1
    assert ("POST", "/api/chat") in [(m, p) for m, p, _ in ollama.requests]


def test_when_every_target_fails_the_reply_is_503_naming_each(fresh_loop_dir, tmp_path):
    from openai import APIStatusError

    with FakeOllama(tmp_path) as ollama:
        overrides = [f"deploy.host={ollama.url}", 'serve.routes={"a": {"primary": "ollama:x", "fallbacks": ["v9"]}}']
        _, server = serve_loop(fresh_loop_dir, overrides)
        with server, pytest.raises(APIStatusError) as error:
            ask(server.url, model="a")
    assert error.value.status_code == 503
    message = error.value.body["message"]
    assert "ollama:x: " in message and "v9: " in message


def test_the_ollama_backend_serves_name_vN_and_promotion_moves_latest(fresh_loop_dir, tmp_path):
    from tuneship.loop.registry import open_loop
    from tuneship.loop.promotion import promote_version

    with FakeOllama(tmp_path) as ollama:
        ollama.reply = lambda messages: (f"ollama says hi to {messages[-1]['content']}", "stop")
        overrides = [f"deploy.host={ollama.url}", "serve.backend=ollama"]
        loop = open_loop(fresh_loop_dir, overrides)
        add_copy_as_version(loop, 2)
        promote_version(loop, 2, "test", "won the gate")
        assert {"tiny:v2", "tiny:latest"} <= set(ollama.models)
        _, server = serve_loop(fresh_loop_dir, overrides)
        with server:
            reply = ask(server.url)
    assert reply.model == "ollama:tiny:v2" and reply.tuneship["version"] == 2
    assert reply.choices[0].message.content == "ollama says hi to Question number 1?"
    latest, tagged = ollama.models["tiny:latest"], ollama.models["tiny:v2"]
    assert latest["files"] == tagged["files"] and latest["template"] == tagged["template"]


def test_a_primary_slower_than_the_timeout_falls_through(fresh_loop_dir, tmp_path):
    import time

    with FakeOllama(tmp_path) as ollama:
        ollama.models["slow"] = {}  # present, so /api/chat answers, but late
        ollama.reply = lambda messages: (time.sleep(3), ("too late", "stop"))[1]
        overrides = [
            f"deploy.host={ollama.url}",
            "serve.timeout=1",
            'serve.routes={"a": {"primary": "ollama:slow", "fallbacks": ["champion"]}}',
        ]
        _, server = serve_loop(fresh_loop_dir, overrides)
        with server:
            ask(server.url, model="tiny")  # the champion's GGUF is loaded before the clock matters
            reply = ask(server.url, model="a")
    assert reply.tuneship["tried"] == ["ollama:slow", "champion"] and reply.tuneship["version"] == 1


def test_the_champion_is_loaded_before_the_first_request(fresh_loop_dir):
    loop, server = serve_loop(fresh_loop_dir)
    with server:
        assert set(server.server.config.app.state.router.pool.models) == {1}


def test_a_backend_that_breaks_falls_through_instead_of_a_500(fresh_loop_dir):
    from pathlib import Path

    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    Path(add_copy_as_version(loop).gguf).write_bytes(b"GGUF but not really")  # llama.cpp raises ValueError
    _, server = serve_loop(fresh_loop_dir, ['serve.routes={"a": {"primary": "v2", "fallbacks": ["champion"]}}'])
    with server:
        reply = ask(server.url, model="a")
    assert reply.tuneship["tried"] == ["v2", "champion"] and reply.tuneship["version"] == 1
