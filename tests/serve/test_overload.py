"""Overload: a bounded queue per model (beyond it 429 with Retry-After), chats that wait without holding the
threads the other endpoints answer on, generations that stop when their client leaves or serve.timeout passes,
and non-champion versions kept loaded (an LRU) without ever holding up the champion. Against uvicorn on
loopback; llama.cpp made slow (one token every DELAY seconds, never a stop token) where a test needs chats in
flight."""

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import serve_loop
from tests.serve.test_routing import add_copy_as_version, ask

DELAY = 0.1  # seconds per token of the slowed llama.cpp


@pytest.fixture
def slow_llama(monkeypatch) -> threading.Event:
    """llama.cpp generates an ordinary token every DELAY seconds and never stops by itself; while the returned
    gate is clear it generates nothing at all (a model held busy for as long as a test needs)."""
    from llama_cpp import Llama

    gate = threading.Event()
    gate.set()

    def generate(self, tokens, **_kwargs):
        token = self.tokenize(b" yes", add_bos=False)[0]
        while True:
            gate.wait(timeout=60)
            time.sleep(DELAY)
            yield token

    monkeypatch.setattr(Llama, "generate", generate)
    yield gate
    gate.set()


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    messages = [{"role": "user", "content": "Question number 1?"}]
    return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "stream": stream}


async def until_done(tasks: list[asyncio.Task], count: int, within: float = 30.0) -> None:
    """Until `count` of `tasks` are done (the refused ones: at once), or `within` seconds have passed."""
    deadline = time.monotonic() + within
    while sum(t.done() for t in tasks) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # any more to come would come now


def test_chats_beyond_the_queue_are_refused_with_429_and_retry_after(fresh_loop_dir, slow_llama):
    from openai import AsyncOpenAI, RateLimitError

    overrides = ["serve.max_concurrent=1", "serve.max_queue=2", "serve.max_tokens=64"]
    _, server = serve_loop(fresh_loop_dir, overrides)
    messages = [{"role": "user", "content": "Question number 1?"}]

    async def scenario() -> list:
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        create = client.chat.completions.create
        chats = [asyncio.create_task(create(model="tiny", messages=messages, max_tokens=4)) for _ in range(8)]
        await until_done(chats, 5)  # 1 generating (held), 2 waiting, 5 refused
        done_while_held = sum(t.done() for t in chats)
        slow_llama.set()
        replies = await asyncio.gather(*chats, return_exceptions=True)
        await client.close()
        return [done_while_held, *replies]

    slow_llama.clear()
    with server:
        done_while_held, *replies = asyncio.run(scenario())
        assert ask(server.url).choices[0].finish_reason == "length"  # the queue is free again
    refused = [r for r in replies if isinstance(r, RateLimitError)]
    answered = [r for r in replies if not isinstance(r, Exception)]
    assert (done_while_held, len(answered), len(refused)) == (5, 3, 5), replies
    for error in refused:
        assert error.status_code == 429 and int(error.response.headers["Retry-After"]) >= 1
        assert error.body["type"] == "rate_limit_exceeded" and "serve.max_queue=2" in error.body["message"]


def test_admin_status_and_pages_answer_fast_while_chats_queue(fresh_loop_dir, slow_llama):
    _, server = serve_loop(fresh_loop_dir, ["serve.max_tokens=64"])

    async def scenario() -> tuple[list[float], Counter]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            chats = [asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(40))) for _ in range(50)]
            await until_done(chats, 50 - 17)  # 1 generating (held), 16 waiting, the rest refused
            timings = []
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as admin:
                for path in ["/v1/loop/status", "/v1/versions", "/loop", "/v1/loop/status"]:
                    started = time.monotonic()
                    assert (await admin.get(path)).status_code == 200, path
                    timings.append(time.monotonic() - started)
            refused = Counter(c.result().status_code for c in chats if c.done())
            for chat in chats:
                chat.cancel()  # the clients leave: their generations stop, their turns are given up
            slow_llama.set()
            await asyncio.gather(*chats, return_exceptions=True)
            return timings, refused

    slow_llama.clear()
    with server:
        timings, refused = asyncio.run(scenario())
        drained = seconds_until_idle(server)
        assert ask(server.url).choices[0].finish_reason == "length"
    assert max(timings) < 1.0, timings
    assert refused == {429: 50 - 17}, refused
    assert drained < 2.0  # the clients that left gave up their turns at once


def seconds_until_idle(server, within: float = 10.0) -> float:
    """Seconds until no model of the served app is generating or has a chat waiting."""
    slots = server.server.config.app.state.router.slots
    started = time.monotonic()
    while any(s.running or s.waiting for s in slots.values()) and time.monotonic() - started < within:
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_client_that_leaves_stops_its_generation(fresh_loop_dir, slow_llama, stream):
    _, server = serve_loop(fresh_loop_dir, ["serve.max_tokens=64"])  # 60 tokens: 6 s of generation
    with server:
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=1.0)) as client:
            if stream:
                with client.stream("POST", "/v1/chat/completions", json=chat_body(60, stream=True)) as response:
                    lines = response.iter_lines()
                    assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            else:
                with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and hangs up
                    client.post("/v1/chat/completions", json=chat_body(60))
        left = time.monotonic()
        reply = ask(server.url)  # 4 tokens: 0.4 s once the model is free
        waited = time.monotonic() - left
    assert reply.choices[0].finish_reason == "length"
    assert waited < 2.5, f"the next chat waited {waited:.1f} s: the left generation kept the model"


def test_a_generation_past_the_timeout_stops_and_frees_the_model(fresh_loop_dir, slow_llama):
    from openai import APIStatusError

    _, server = serve_loop(fresh_loop_dir, ["serve.max_tokens=64", "serve.timeout=2"])
    with server:
        with pytest.raises(APIStatusError) as error:
            ask_tokens(server.url, 60)  # 6 s of generation, 2 s allowed
        started = time.monotonic()
        reply = ask_tokens(server.url, 4)  # 0.4 s once the model is free
        waited = time.monotonic() - started
    assert error.value.status_code == 503 and "serve.timeout=2 s" in error.value.body["message"]
    assert reply.choices[0].finish_reason == "length" and waited < 1.5


def ask_tokens(url: str, max_tokens: int):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Question number 1?"}], max_tokens=max_tokens
    )


@pytest.fixture
def gguf_loads(monkeypatch) -> Counter:
    """Run folder name -> how many times its GGUF was loaded into llama.cpp."""
    from tuneship.evaluate import backends

    loads: Counter = Counter()
    load = backends.load_gguf

    def counted(gguf_path: Path, n_ctx: int, **kwargs):
        loads[Path(gguf_path).parent.parent.name] += 1
        return load(gguf_path, n_ctx, **kwargs)

    monkeypatch.setattr(backends, "load_gguf", counted)
    return loads


def test_alternating_two_versions_loads_each_gguf_once(fresh_loop_dir, gguf_loads):
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    add_copy_as_version(loop, 2)
    add_copy_as_version(loop, 3)
    # merged: a GGUF per version (adapters on one base: test_adapter_versions.py)
    _, server = serve_loop(fresh_loop_dir, ["loop.version_format=merged"])
    with server:
        answered = [ask(server.url, model=name).tuneship["version"] for name in ["tiny-v2", "tiny-v3"] * 3]
        loaded = set(server.server.config.app.state.router.pool.models)
    assert answered == [2, 3] * 3
    assert gguf_loads == {"tiny": 1, "tiny-v2": 1, "tiny-v3": 1}
    assert loaded == {1, 2, 3}


def test_the_least_recently_used_version_is_closed_beyond_max_loaded_models(fresh_loop_dir, gguf_loads):
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    for version_id in (2, 3):
        add_copy_as_version(loop, version_id)
    _, server = serve_loop(fresh_loop_dir, ["serve.max_loaded_models=1", "loop.version_format=merged"])
    with server:
        for name in ["tiny-v2", "tiny-v3", "tiny-v2"]:
            ask(server.url, model=name)
        loaded = set(server.server.config.app.state.router.pool.models)
    assert loaded == {1, 2}  # the champion always; of the others the one used last
    assert gguf_loads == {"tiny": 1, "tiny-v2": 2, "tiny-v3": 1}


def test_loading_another_version_never_holds_up_the_champion(fresh_loop_dir, monkeypatch):
    from tuneship.evaluate import backends
    from tuneship.loop.registry import open_loop

    load = backends.load_gguf

    def slow_for_v2(gguf_path: Path, n_ctx: int, **kwargs):
        if Path(gguf_path).parent.parent.name == "tiny-v2":
            time.sleep(3)
        return load(gguf_path, n_ctx, **kwargs)

    monkeypatch.setattr(backends, "load_gguf", slow_for_v2)
    add_copy_as_version(open_loop(fresh_loop_dir), 2)
    _, server = serve_loop(fresh_loop_dir)
    with server:
        other = threading.Thread(target=lambda: ask(server.url, model="tiny-v2"), daemon=True)
        other.start()
        time.sleep(0.5)  # tiny-v2 is loading now
        started = time.monotonic()
        assert ask(server.url).tuneship["version"] == 1
        waited = time.monotonic() - started
        other.join(timeout=30)
    assert waited < 1.5, f"the champion waited {waited:.1f} s for another version's GGUF to load"


def test_a_short_locust_run_has_no_5xx_and_stores_each_feedback_once(tiny_base_run):
    from benchmarks.serve_load import run_load

    result = run_load(tiny_base_run, users=10, seconds=8, retry_at_once=True)
    assert result.statuses.get("200", 0) > 0 and result.server_errors == 0, result.statuses
    assert result.refused_without_retry_after == 0
    assert result.feedback_accepted > 0
    assert result.feedback_rows == result.feedback_stored_once == result.feedback_accepted
    assert result.replays_not_matching == 0
    assert result.status_p99_ms() < 1000


def test_slots_hand_turns_over_in_order_and_a_leaving_chat_frees_its_place():
    from tuneship.serve.generation import Overloaded, Slots

    async def scenario() -> list[str]:
        slots, order = Slots("m", concurrent=1, queue=2), []
        await slots.acquire(1)  # generating

        async def wait_turn(name: str) -> None:
            await slots.acquire(5)
            order.append(name)

        first, leaving = asyncio.create_task(wait_turn("first")), asyncio.create_task(wait_turn("leaving"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as full:
            await slots.acquire(1)
        assert full.value.retry_after >= 1
        leaving.cancel()  # its client left: its place in line is free again
        await asyncio.gather(leaving, return_exceptions=True)
        third = asyncio.create_task(wait_turn("third"))
        await asyncio.sleep(0)
        assert (slots.running, slots.waiting) == (1, 2)
        slots.release(0.1)
        await first
        slots.release(0.1)
        await third
        slots.release(0.1)
        assert (slots.running, slots.waiting) == (0, 0)
        with pytest.raises(Overloaded):  # no turn within the time given
            await asyncio.gather(slots.acquire(1), slots.acquire(0.05))
        return order

    assert asyncio.run(scenario()) == ["first", "third"]
