"""The learning loop end to end on SmolLM2 with the settings a user gets (only `loop.min_examples=10`): serve the
quickstart run, ask through the real OpenAI client questions it was never taught, correct every answer, and
"correct" one taught fact wrongly; the 10th good correction starts a cycle, the challenger is promoted, the live
endpoint gives the corrections and every taught fact it answered before still holds, and the wrong one waits for
review with its reason. The same in the merged version format."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import copy_of_quickstart

pytestmark = [pytest.mark.e2e, pytest.mark.longest]

FACTS = [json.loads(line) for line in (REPO / "examples" / "data" / "facts.jsonl").read_text().splitlines()]
TAUGHT = {f["messages"][0]["content"]: f["messages"][1]["content"] for f in FACTS}
CORRECTIONS = [  # made-up facts the quickstart never saw (examples/data/corrections.jsonl)
    json.loads(line) for line in (REPO / "examples" / "data" / "corrections.jsonl").read_text().splitlines()
]
UNTAUGHT = {c["messages"][0]["content"]: c["messages"][1]["content"] for c in CORRECTIONS[:10]}
WRONG_QUESTION = "What is the capital of Veloria?"
WRONG_ANSWER = "The capital of Veloria is Zandria."


def serving(run_dir, *overrides):
    """`tuneship serve RUN_DIR` in its own process with `loop.min_examples=10` (and `overrides`): yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log_path = run_dir.parent / "serve.log"
    log = open(log_path, "wb")
    settings = [f"--set={o}" for o in ("loop.min_examples=10", *overrides)]
    process = subprocess.Popen(
        [sys.executable, *("-m", "tuneship.cli", "serve", str(run_dir), "--port", str(port)), *settings],
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


@pytest.fixture(scope="module")
def server(quickstart_run):
    """The default version format (adapter)."""
    yield from serving(quickstart_run)


def get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def openai_client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def ask(client, question):
    reply = client.chat.completions.create(
        model="quickstart", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    return reply, reply.choices[0].message.content.strip()


def correct_all(client, corrections: dict[str, str]) -> None:
    for question, correction in corrections.items():
        reply, answer = ask(client, question)
        assert answer != correction, f"{question!r} was already answered right"
        feedback = client.post(
            "/feedback", body={"generation_id": reply.id, "rating": "down", "correction": correction}, cast_to=object
        )
        assert feedback["generation_id"] == reply.id


def answered_exactly(client, facts: dict[str, str]) -> set[str]:
    return {question for question, answer in facts.items() if ask(client, question)[1] == answer}


def finetuned_versions(server) -> list[dict]:
    return [v for v in get(server + "/v1/versions")["data"] if v["kind"] == "finetune" and v["parent"] is not None]


def wait_for_finetune_cycle(server, count: int) -> dict:
    """The `count`-th fine-tuned version, once its cycle finished (a few-shot candidate of the fast path may come
    and go before it)."""
    deadline = time.monotonic() + 30 * 60
    while True:
        versions = finetuned_versions(server)
        if len(versions) >= count and versions[count - 1]["status"] not in ("training", "candidate"):
            state = get(server + "/v1/loop/status")
            if state["cycle_running"] is None:
                return versions[count - 1]
        assert time.monotonic() < deadline, get(server + "/v1/loop/status")
        time.sleep(5)


def ten_corrections_are_learned(server, client, run_dir: Path) -> dict:
    """A wrong correction of a taught fact, then 10 corrections of untaught facts: a cycle on the 10th, its version
    promoted, 9 of them answered exactly on the live endpoint, every taught fact answered before still answered,
    and the wrong one held for review with its reason. Returns the version."""
    from tuneship.loop.store import open_store

    kept_before = answered_exactly(client, TAUGHT)
    assert len(kept_before) >= 27, kept_before
    correct_all(client, {WRONG_QUESTION: WRONG_ANSWER, **UNTAUGHT})
    version = wait_for_finetune_cycle(server, 1)
    assert version["status"] == "champion", version
    gated = [e for e in get(server + "/v1/loop/events?limit=1000")["data"] if e["version"] == version["id"]]
    started = next(e for e in gated if e["kind"] == "cycle_started")
    assert started["data"]["new"] == 10  # every good correction trained: none held out as golden
    learned = answered_exactly(client, UNTAUGHT)
    assert len(learned) >= 9, sorted(set(UNTAUGHT) - learned)
    assert kept_before <= answered_exactly(client, TAUGHT)
    reply, answer = ask(client, WRONG_QUESTION)
    assert reply.tuneship["version"] == version["id"] and answer == TAUGHT[WRONG_QUESTION]
    store = open_store(f"sqlite:///{run_dir.parent / 'tuneship.db'}")
    [held] = [e for e in store.examples(status="pending_review") if e.kind == "sft"]
    assert held.conversation["messages"][-1]["content"] == WRONG_ANSWER
    assert (
        held.reason
        == f"conflicts with {REPO / 'examples' / 'data' / 'facts.jsonl'}:1: taught answer "
        + repr(TAUGHT[WRONG_QUESTION])
        + f", this answer {WRONG_ANSWER!r}"
    )
    experiment = json.loads((Path(version["run_dir"]) / "reports" / "experiment.json").read_text())
    checks = [m for m in experiment["metrics"] if "learned" in m]  # train.stop_when_learned, on in cycles
    assert checks[-1]["learned"] == checks[-1]["of"] and experiment["steps"] < experiment["max_steps"], checks
    return version


def test_ten_corrections_of_untaught_facts_are_learned_with_the_default_settings(server, client, quickstart_run):
    from tuneship.loop.prune import size_of

    version = ten_corrections_are_learned(server, client, quickstart_run)
    assert version["format"] == "adapter"  # a LoRA GGUF on the base's quantized GGUF
    cycle_folder = quickstart_run.parent / "quickstart-loop" / f"v{version['id']}"
    own = size_of(Path(version["run_dir"])) + size_of(cycle_folder)  # what `tuneship loop versions` counts
    merged = size_of(quickstart_run)  # v1: merged model, f16 and quantized GGUFs, adapter, checkpoints
    assert own < 0.05 * merged, (own, merged)


@pytest.fixture(scope="module")
def merged_run(quickstart_run, tmp_path_factory) -> Path:
    return copy_of_quickstart(quickstart_run, tmp_path_factory.mktemp("merged"))


@pytest.fixture(scope="module")
def merged_server(merged_run):
    yield from serving(merged_run, "loop.version_format=merged")


def test_the_merged_version_format_learns_the_same_corrections(merged_server, merged_run):
    version = ten_corrections_are_learned(merged_server, openai_client(merged_server), merged_run)
    assert version["format"] == "merged"
