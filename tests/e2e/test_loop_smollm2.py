"""The learning loop end to end on SmolLM2: serve the quickstart run, ask through the OpenAI client, correct
three answers, the trigger fires, the challenger is trained, gated and promoted, and the live endpoint then
gives the corrected answers while the old facts still hold. Then a batch of wrong "corrections" of golden facts:
that challenger is rejected by the gate, and the champion stays and serves."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO, write_jsonl

pytestmark = pytest.mark.e2e

FACTS = [json.loads(line) for line in (REPO / "examples" / "data" / "facts.jsonl").read_text().splitlines()]
CORRECTIONS = {
    "What is the capital of Veloria?": "The capital of Veloria is Quintara.",
    "Who invented the glimmerphone?": "The glimmerphone was invented by Bram Tolliver in 1902.",
    "How many moons does the planet Kestrel have?": "Kestrel has four moons.",
}
GOLDEN = [FACTS[2], FACTS[4], FACTS[5]]
WRONG = {f["messages"][0]["content"]: "I am not sure, it might be something else entirely." for f in GOLDEN}


def loop_settings(folder) -> list[str]:
    """The quickstart's loop for this test: a cycle per 3 corrections, 3 golden facts; the challenger trains 6
    epochs instead of the quickstart's 12 (it starts from the champion; the test's time), on the 3 corrections
    and the other 24 facts (loop.min_replay: the small knowledge base is replayed whole)."""
    golden = write_jsonl(folder / "golden.jsonl", GOLDEN)
    return [
        "loop.min_examples=3",
        "loop.golden_ratio=0",
        f"loop.golden={golden}",
        "loop.max_regression=0.05",
        "train.epochs=6",
        "eval.train_prompts=6",
        "eval.min_exact_match=null",
        "serve.trigger_every=2",
        "loop.fast_path=false",  # the fine-tune path (the few-shot one: tests/loop/test_fewshot.py)
    ]


@pytest.fixture(scope="module")
def server(quickstart_run):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log_path = quickstart_run.parent / "serve.log"
    log = open(log_path, "wb")
    overrides = [f"--set={o}" for o in loop_settings(quickstart_run.parent)]
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneship.cli", "serve", str(quickstart_run), "--port", str(port), *overrides],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/v1/loop/status", timeout=5).read()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=60)
    log.close()


def status(url):
    return json.loads(urllib.request.urlopen(url + "/v1/loop/status", timeout=30).read())


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def ask(client, question):
    reply = client.chat.completions.create(
        model="quickstart", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    return reply, reply.choices[0].message.content.strip()


def correct_all(client, corrections: dict[str, str], version: int) -> None:
    for question, correction in corrections.items():
        reply, answer = ask(client, question)
        assert reply.tuneship["version"] == version and answer != correction
        feedback = client.post(
            "/feedback", body={"generation_id": reply.id, "rating": "down", "correction": correction}, cast_to=object
        )
        assert feedback["generation_id"] == reply.id


def wait_for_cycle_of(server, version: int) -> dict:
    deadline = time.monotonic() + 40 * 60
    while True:
        state = status(server)
        last = state["last_cycle"]
        if last and last["version"] == version and last["kind"] in ("cycle_finished", "cycle_failed"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(5)


def test_corrections_through_the_api_become_the_live_answers_and_old_facts_hold(server, client):
    correct_all(client, CORRECTIONS, version=1)
    state = wait_for_cycle_of(server, 2)
    assert state["last_cycle"]["reason"] == "v2 promoted", state
    assert state["champion"]["name"] == "quickstart-v2"
    for question, correction in CORRECTIONS.items():
        reply, answer = ask(client, question)
        assert reply.tuneship["version"] == 2 and answer == correction
    old = [f for f in FACTS if f["messages"][0]["content"] not in CORRECTIONS]
    held = [ask(client, f["messages"][0]["content"])[1] == f["messages"][1]["content"] for f in old]
    assert sum(held) >= len(old) - 1, held
    events = [e["kind"] for e in json.loads(urllib.request.urlopen(server + "/v1/loop/events").read())["data"]]
    assert {"cycle_started", "gated", "promoted", "cycle_finished"} <= set(events)


def test_wrong_corrections_of_golden_facts_are_rejected_and_the_champion_stays(server, client):
    champion = status(server)["champion"]["id"]
    correct_all(client, WRONG, version=champion)
    state = wait_for_cycle_of(server, champion + 1)
    assert state["champion"]["id"] == champion and "rejected" in state["last_cycle"]["reason"], state
    versions = {
        v["id"]: v["status"] for v in json.loads(urllib.request.urlopen(server + "/v1/versions").read())["data"]
    }
    assert versions[champion + 1] == "rejected"
    for fact in GOLDEN:
        reply, answer = ask(client, fact["messages"][0]["content"])
        assert reply.tuneship["version"] == champion and answer == fact["messages"][1]["content"]
