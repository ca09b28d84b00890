"""The API through the real OpenAI client and plain HTTP, against uvicorn on loopback, llama.cpp answering."""

import http.client
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.serve.conftest import serve_loop

AUTH = {"Authorization": "Bearer s3cret"}


def post(server, path, body, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data, {"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}"), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), error.headers


def get(server, path):
    with urllib.request.urlopen(urllib.request.Request(server.url + path, headers=AUTH), timeout=60) as response:
        return json.loads(response.read())


def ask(client, question="Question number 3?", **kwargs):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=8, **kwargs
    )


def test_models_lists_the_loop_and_its_versions(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a_completion_is_answered_by_the_champion_gguf_and_stored(client, served):
    loop, _ = served
    reply = ask(client)
    choice = reply.choices[0]
    assert reply.id.startswith("chatcmpl-") and choice.finish_reason in ("stop", "length")
    assert reply.model == "tiny" and reply.tuneship["version"] == 1
    stored = loop.store.generation(reply.id)
    assert stored.answer == choice.message.content and stored.version_id == 1
    assert stored.messages == [{"role": "user", "content": "Question number 3?"}]
    assert stored.completion_tokens == reply.usage.completion_tokens > 0
    assert stored.prompt_tokens == reply.usage.prompt_tokens > 0 and stored.latency_ms > 0


def test_the_answer_is_what_the_gguf_answers_in_llama_cpp_with_the_run_chat_format(client, served):
    from pathlib import Path

    from tuneship.chat.format import ChatFormat
    from tuneship.data.conversation import Conversation, Message, SourceRef
    from tuneship.evaluate.backends import LlamaCppRunner

    loop, _ = served
    champion = loop.store.champion()
    chat_format = ChatFormat.load(Path(champion.run_dir) / "adapter")
    runner = LlamaCppRunner(Path(champion.gguf))
    try:
        conversation = Conversation([Message("user", "Question number 5?")], SourceRef("t", 1))
        expected = runner.answer(chat_format, chat_format.generation_prompt(conversation), 8)
    finally:
        runner.close()
    assert ask(client, "Question number 5?").choices[0].message.content.strip() == expected.text


def test_streaming_sends_the_same_answer_in_chunks_and_stores_it(client, served):
    loop, _ = served
    whole = ask(client, "Question number 7?").choices[0].message.content
    chunks = list(ask(client, "Question number 7?", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1
    assert loop.store.generation(chunks[0].id).answer == whole


def test_feedback_is_created_once_per_idempotency_key(client, served):
    loop, server = served
    generation = ask(client).id
    body = {"generation_id": generation, "rating": "down", "correction": "Answer number 3.", "comment": None}
    status, first, _ = post(server, "/v1/feedback", body, {**AUTH, "Idempotency-Key": "k-1"})
    status_again, again, headers = post(server, "/v1/feedback", body, {**AUTH, "Idempotency-Key": "k-1"})
    assert status == status_again == 201 and first["id"] == again["id"] and again["replayed"]
    assert headers.get("Idempotent-Replayed") == "true"
    assert [f.id for f in loop.store.feedback_for(generation)] == [first["id"]]


@pytest.mark.parametrize(
    "body, headers, status, param, message",
    [
        ({"generation_id": "chatcmpl-nope", "rating": "up"}, AUTH, 404, "generation_id", "no generation"),
        ({"generation_id": "x", "rating": 9}, AUTH, 422, "rating", "1..5"),
        ({"generation_id": "x", "rating": "meh"}, AUTH, 422, "rating", "rating"),
        ({"generation_id": "x"}, AUTH, 422, "rating", "a rating or a correction is required"),
        ({"rating": "up"}, AUTH, 422, "generation_id", "Field required"),
        ({"generation_id": "x", "rating": "up", "extra": 1}, AUTH, 422, "extra", "Extra inputs"),
        ({"generation_id": "x", "rating": "up"}, {}, 401, "Authorization", "bearer token"),
        ({"generation_id": "x", "rating": "up"}, {"Authorization": "Bearer wrong"}, 401, "Authorization", "bearer"),
    ],
)
def test_bad_feedback_is_a_4xx_naming_the_problem(served, body, headers, status, param, message):
    code, reply, _ = post(served[1], "/v1/feedback", body, headers)
    assert code == status and reply["error"]["param"] == param and message in reply["error"]["message"]


def test_an_oversized_body_is_413_and_malformed_json_is_422(served):
    _, server = served
    code, reply, _ = post(server, "/v1/feedback", None, AUTH, raw=b"{" + b" " * 20_000 + b"}")
    assert code == 413 and "serve.max_body_bytes" in reply["error"]["message"]
    code, reply, _ = post(server, "/v1/chat/completions", None, raw=b'{"model": "tiny", "messages": [')
    assert code == 422 and reply["error"]["param"]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "tiny", "messages": []}, 422, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 65}, 422, "messages"),
        ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 422, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 422, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 422, "temperature"),
    ],
)
def test_bad_chat_requests_are_4xx_naming_the_field(served, body, status, param):
    code, reply, _ = post(served[1], "/v1/chat/completions", body, AUTH)
    assert code == status and reply["error"]["param"] == param


def test_loop_status_and_versions(served, client):
    _, server = served
    status = get(server, "/v1/loop/status")
    assert status["champion"]["id"] == 1 and status["threshold"] == 2 and status["cycle_running"] is None
    versions = get(server, "/v1/versions")["data"]
    assert [(v["id"], v["status"]) for v in versions] == [(1, "champion")]
    assert {"registered"} <= {e["kind"] for e in get(server, "/v1/loop/events")["data"]}


def test_admin_endpoints_need_the_key_and_refuse_what_cannot_be_done(served):
    _, server = served
    assert post(server, "/v1/rollback", {})[0] == 401
    code, reply, _ = post(server, "/v1/rollback", {}, AUTH)
    assert code == 409 and "nothing to roll back to" in reply["error"]["message"]
    code, reply, _ = post(server, "/v1/versions/7/promote", {}, AUTH)
    assert code == 404 and "no version 7" in reply["error"]["message"]


def test_openapi_documents_every_endpoint(served):
    paths = set(get(served[1], "/openapi.json")["paths"])
    assert {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/feedback",
        "/v1/loop/status",
        "/v1/loop/cycle",
        "/v1/versions",
        "/v1/versions/{version_id}/promote",
        "/v1/rollback",
    } <= paths


def test_an_idle_connection_stays_open_past_uvicorns_own_5_s(served):
    """A load balancer or proxy reuses an idle connection for up to its idle timeout (60 s for AWS ALB and nginx);
    a server that closes it sooner makes the balancer's next request on it fail (a 502)."""
    connection = http.client.HTTPConnection("127.0.0.1", served[1].port, timeout=60)
    first = None
    for pause in (0, 6):
        time.sleep(pause)
        connection.request("GET", "/v1/models", headers=AUTH)
        response = connection.getresponse()
        response.read()
        assert response.status == 200 and response.getheader("connection") != "close"
        first = first or connection.sock
    assert connection.sock is first  # the same connection answered both
    connection.close()


def test_serve_keep_alive_seconds_closes_idle_connections_at_its_time(fresh_loop_dir):
    loop, server = serve_loop(fresh_loop_dir, ["serve.keep_alive_seconds=0.5"])
    with server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        started = time.monotonic()
        assert connection.sock.recv(1) == b""  # closed by the server (the 3 s timeout would raise)
        assert time.monotonic() - started < 2
        connection.close()


def test_the_window_forgets_feedback_older_than_a_minute():
    from tuneship.serve.ratelimit import PerClientLimit

    limit = PerClientLimit(1)
    assert limit.retry_after("shop", now=0.0) is None and limit.retry_after("shop", now=10.0) == 50
    assert limit.retry_after("other", now=10.0) is None and limit.retry_after("shop", now=60.0) is None
