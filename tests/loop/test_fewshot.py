"""The fast path on the tiny model: a few-shot candidate (the newest corrections as example turns, within a token
budget counted with the run's tokenizer) through the same gate in llama.cpp, the registry, serving and Ollama."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tests.loop.test_cycle import correct
from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401

QUIET = Console(file=io.StringIO())
SHORT = [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")]
LONG = ("Tell me everything.", "Answer " + " ".join(f"word{i}" for i in range(120)) + ".")


def turns(pairs):
    return [t for q, a in pairs for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def chat_format_of(run_dir):
    from tuneship.chat.format import ChatFormat

    return ChatFormat.load(Path(run_dir) / "adapter")


class PromptSpy:
    """Records every prompt llama.cpp is asked to answer, as the ChatFormat renders it (the real GGUF still
    answers)."""

    def __init__(self, monkeypatch):
        from tuneship.evaluate import backends

        self.prompts: list[str] = []
        original = backends.generate_with_gguf

        def generate(gguf_path, chat_format, prompts, *args, **kwargs):
            self.prompts += [chat_format.generation_prompt(p.conversation) for p in prompts]
            return original(gguf_path, chat_format, prompts, *args, **kwargs)

        monkeypatch.setattr(backends, "generate_with_gguf", generate)


def fewshot_loop(loop_dir, budget: int):
    """The loop with the three corrections posted in order: short, long, short (the last is the newest)."""
    from tuneship.loop.registry import open_loop

    settings = [f"loop.fast_path_budget={budget}", "loop.min_examples=50", "train.max_seq_len=512"]
    loop = open_loop(loop_dir, settings)  # the long correction passes the audit: it is not cut
    correct(loop, [SHORT[0], LONG, SHORT[1]])
    return loop


def test_the_newest_corrections_that_fit_the_budget_become_the_shots_and_a_long_one_is_left_out(
    fresh_loop_dir,  # noqa: F811
    monkeypatch,
):
    from tuneship.deploy.modelfile import parse_modelfile
    from tuneship.loop.shots import shot_tokens
    from tuneship.loop.examples import waiting_examples
    from tuneship.loop.cycle import run_cycle

    chat_format = chat_format_of(fresh_loop_dir)
    both_short = shot_tokens(chat_format, turns(SHORT))
    long_alone = shot_tokens(chat_format, turns([LONG]))
    assert len(chat_format.encode(LONG[1])) < long_alone and both_short < long_alone
    loop = fewshot_loop(fresh_loop_dir, budget=both_short)
    spy = PromptSpy(monkeypatch)
    result = run_cycle(loop, QUIET, "test", "by hand", kind="fewshot")

    champion_before, candidate = loop.store.version(1), loop.store.version(2)
    assert candidate.kind == "fewshot" and candidate.parent_id == 1 and candidate.name == "tiny-v2"
    assert candidate.run_dir == champion_before.run_dir and candidate.gguf == champion_before.gguf
    assert candidate.shots == turns(SHORT) and candidate.shot_count == 2  # oldest first, newest nearest the question
    numbers = candidate.metrics["fewshot"]
    assert numbers["tokens"] == both_short == numbers["budget"] and numbers["context"] == loop.cfg.serve.n_ctx
    [long_example] = [
        e for e in loop.store.examples() if e.kind == "sft" and e.conversation["messages"][-1]["content"] == LONG[1]
    ]
    [left_out] = numbers["left_out"]
    assert left_out["example"] == long_example.id and left_out["tokens"] == long_alone
    [selected] = loop.store.events(kind="fewshot_selected")
    assert len(selected.data["considered"]) == 3 and "left out 1" in selected.reason

    # the gate: the champion's prompts without the shots, the challenger's (the same GGUF) with them
    gated = loop.store.events(kind="gated")[0]
    asked = sum(s["prompts"] for s in gated.data["champion"].values())
    assert set(gated.data["challenger"]) == {"golden", "replay", "new"} and asked >= 5
    champion_prompts, challenger_prompts = spy.prompts[:asked], spy.prompts[asked : 2 * asked]
    shot_block = chat_format.render_text(turns(SHORT), add_generation_prompt=False)
    assert not any("Answer number 9" in p for p in champion_prompts)
    before_the_question = shot_block.split("Answer number 98.")[0]
    assert len(challenger_prompts) == asked and all(p.startswith(before_the_question) for p in challenger_prompts)
    assert all(p.count("Answer number 99.") == 1 and p.count("Answer number 98.") == 1 for p in challenger_prompts)

    # recorded like any version; the corrections are still waiting for a fine-tune cycle
    assert result.status in ("promoted", "rejected")
    assert candidate.id == result.version_id
    assert loop.store.version(2).status == ("champion" if result.status == "promoted" else "rejected")
    assert loop.store.events()[0].kind == "cycle_finished" and loop.store.lease("cycle") is None
    assert {e.id for e in waiting_examples(loop.store)} >= {long_example.id, *candidate.example_ids}

    # shipped as a Modelfile: the shots are its MESSAGE lines, num_ctx the context they were counted against
    started = loop.store.events(kind="cycle_started")[0]
    assert started.data["kind"] == "fewshot" and started.data["shots"] == 2
    pairs = parse_modelfile(Path(started.data["modelfile"]).read_text())
    assert [tuple(v.split(" ", 1)) for k, v in pairs if k == "MESSAGE"] == [
        (t["role"], t["content"]) for t in turns(SHORT)
    ]
    assert ("PARAMETER", f"num_ctx {loop.cfg.serve.n_ctx}") in pairs
    assert pairs[0] == ("FROM", str(Path(candidate.gguf).resolve()))


def test_no_shot_when_no_correction_fits_says_so_and_is_not_retried(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.trigger import trigger_decision
    from tuneship.loop.cycle import NothingToTrain, run_cycle

    loop = fewshot_loop(fresh_loop_dir, budget=3)
    with pytest.raises(NothingToTrain, match="0 of 3 corrections as shots.*raise loop.fast_path_budget"):
        run_cycle(loop, QUIET, kind="fewshot")
    assert [v.id for v in loop.store.versions()] == [1] and not loop.store.events(kind="cycle_failed")
    assert not trigger_decision(loop.store, loop.cfg.loop).is_due  # the same corrections are not tried again


def test_a_triggered_fewshot_candidate_gives_way_when_a_burst_of_corrections_made_a_fine_tune_due(
    fresh_loop_dir,  # noqa: F811
):
    from tuneship.loop.cycle import NothingToTrain, run_cycle
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir, ["loop.min_examples=3", "train.max_seq_len=512"])
    correct(loop, [SHORT[0], LONG, SHORT[1]])  # all three came in before the candidate's process harvested them
    with pytest.raises(NothingToTrain, match=r"a fine-tune cycle is due \(3 new examples"):
        run_cycle(loop, QUIET, actor="trigger", reason="new corrections", kind="fewshot")
    assert [v.id for v in loop.store.versions()] == [1] and not loop.store.events(kind="cycle_failed")


def add_fewshot_version(loop, shots):
    """A few-shot v2 over v1's run, as the fast path registers one, promoted by hand."""
    from tuneship.loop.promotion import promote_version

    base = loop.store.version(1)
    loop.store.add_version(
        id=2,
        name="tiny-v2",
        parent_id=1,
        run_dir=base.run_dir,
        gguf=base.gguf,
        status="candidate",
        kind="fewshot",
        shots=shots,
        example_ids=["ex-a"],
        metrics={"fewshot": {"context": loop.cfg.serve.n_ctx}},
    )
    return promote_version(loop, 2, "test", "by hand")


def test_a_fewshot_champion_answers_through_its_shots(fresh_loop_dir):  # noqa: F811
    from openai import OpenAI

    from tests.serve.conftest import serve_loop
    from tuneship.data.conversation import Conversation, Message, SourceRef
    from tuneship.loop.shots import with_shots
    from tuneship.loop.registry import open_loop

    shots = turns(SHORT[:1])
    add_fewshot_version(open_loop(fresh_loop_dir), shots)
    chat_format = chat_format_of(fresh_loop_dir)
    question = Conversation([Message("user", "Question number 1?")], SourceRef("t", 0))
    with_them = len(chat_format.encode(chat_format.generation_prompt(with_shots(question, shots))))
    without = len(chat_format.encode(chat_format.generation_prompt(question)))
    _, server = serve_loop(fresh_loop_dir)
    with server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Question number 1?"}], max_tokens=4
        )
        listed = client.get("/versions", cast_to=object)
    assert reply.tuneship["version"] == 2 and reply.usage.prompt_tokens == with_them > without
    v2 = next(v for v in listed["data"] if v["id"] == 2)
    assert v2["kind"] == "fewshot" and v2["shot_count"] == 1 and v2["shots"] == shots


def test_publishing_a_fewshot_version_to_ollama_sends_its_shots_as_messages(fresh_loop_dir, tmp_path):  # noqa: F811
    from tests.deploy.fake_ollama import FakeOllama
    from tuneship.loop.registry import open_loop

    with FakeOllama(tmp_path) as ollama:
        loop = open_loop(fresh_loop_dir, [f"deploy.host={ollama.url}", "serve.backend=ollama"])
        add_fewshot_version(loop, turns(SHORT))
    tagged, latest = ollama.models["tiny:v2"], ollama.models["tiny:latest"]
    assert tagged["messages"] == turns(SHORT) == latest["messages"]
    assert tagged["parameters"]["num_ctx"] == loop.cfg.serve.n_ctx


def test_a_fine_tune_after_a_fewshot_champion_trains_its_shots_from_its_run(fresh_loop_dir):  # noqa: F811
    """What the next fine-tune cycle trains (without training it: test_cycle.py runs a whole cycle)."""
    from tuneship.loop.cycle import challenger_config
    from tuneship.loop.registry import open_loop
    from tuneship.loop.signals import harvest
    from tuneship.loop.cycle import _resume_or_new_version
    from tuneship.loop.examples import write_cycle_data

    loop = open_loop(fresh_loop_dir, ["loop.min_examples=2"])
    correct(loop, SHORT)
    harvest(loop.store, loop.cfg)
    champion = add_fewshot_version(loop, turns(SHORT))
    v3 = _resume_or_new_version(loop, champion)
    assert v3.kind == "finetune" and v3.parent_id == 2 and not v3.shots
    data = write_cycle_data(loop.store, v3, loop.cycle_dir(v3.id))
    train_file = data.train
    cfg = challenger_config(loop.cfg, v3.name, Path(champion.run_dir), data)
    assert cfg.model.adapter_from == str(fresh_loop_dir)  # the few-shot champion's run: v1's adapter
    trained = [json.loads(line)["messages"][-1]["content"] for line in train_file.read_text().splitlines()]
    assert {a for _, a in SHORT} <= set(trained)


def post_correction(store, index: int, question: str, correction: str):
    from tests.loop.test_store import add_generation

    add_generation(store, f"gen-{index}", answer="something else", question=question)
    store.add_feedback(f"gen-{index}", "down", correction, None)


def test_the_trigger_takes_the_fast_path_only_below_the_threshold_and_once_per_new_correction(store):
    from tuneship.config import Config
    from tuneship.loop.fewshot import SELECTED_EVENT, shot_pool
    from tuneship.loop.signals import harvest
    from tuneship.loop.trigger import trigger_decision

    cfg = Config()
    cfg.loop.min_examples = 3
    post_correction(store, 1, "Capital of Veloria?", "Quintara.")
    harvest(store, cfg)
    decision = trigger_decision(store, cfg.loop)
    assert decision.is_due and decision.kind == "fewshot" and decision.reason.startswith("1/3 new examples; 1 new")

    pool, _ = shot_pool(store)  # what a few-shot attempt considered: not tried again with the same corrections
    store.add_event(SELECTED_EVENT, "test", "tried", {"considered": [e.id for e in pool]})
    assert trigger_decision(store, cfg.loop).reason == "1/3 new examples"

    post_correction(store, 2, "Its river?", "The Vel.")
    harvest(store, cfg)
    assert trigger_decision(store, cfg.loop).kind == "fewshot"
    store.add_event("cycle_failed", "trigger", "broke")  # the same back-off as a fine-tune cycle
    assert "backing off" in trigger_decision(store, cfg.loop).reason
    cfg.loop.backoff_seconds = 0
    store.acquire_lease("cycle", "worker-1", 60, stage="gate")  # and never while a cycle runs
    assert not trigger_decision(store, cfg.loop).is_due
    store.release_lease("cycle", "worker-1")
    cfg.loop.fast_path = False
    assert trigger_decision(store, cfg.loop).reason == "2/3 new examples"

    cfg.loop.fast_path = True
    post_correction(store, 3, "Its mountain?", "Mount Orel.")
    harvest(store, cfg)
    decision = trigger_decision(store, cfg.loop)
    assert decision.is_due and decision.kind == "finetune" and decision.reason == "3 new examples (threshold 3)"


def test_thumbs_up_answers_and_base_run_examples_are_no_shots(store):
    from tests.loop.test_store import add_generation, example
    from tuneship.config import Config
    from tuneship.loop.fewshot import shot_pool
    from tuneship.loop.signals import harvest

    cfg = Config()
    add_generation(store, "gen-up", answer="Paris.")
    store.add_feedback("gen-up", "up", None, None)
    store.add_examples([example("from-the-base-run")])
    post_correction(store, 1, "Capital of Veloria?", "Quintara.")
    post_correction(store, 2, "Capital of Veloria?", "Quintara, on the Vel.")  # the newer correction wins
    harvest(store, cfg)
    pool, superseded = shot_pool(store)
    assert [e.conversation["messages"][-1]["content"] for e in pool] == ["Quintara, on the Vel."]
    [older] = superseded
    assert "newer correction of the same prompt" in older["reason"]


def test_the_servers_trigger_starts_the_fast_path_in_its_standby_process_and_the_next_one_waits(
    fresh_loop_dir,  # noqa: F811
):
    """serve.standby_cycle: the cycle's process was started (and imported its libraries) before it was due; the
    trigger tells it which cycle to run."""
    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import CycleLauncher, TriggerThread, create_app

    loop = open_loop(fresh_loop_dir)  # loop.min_examples 2: one correction is below it
    correct(loop, SHORT[:1])
    launcher = CycleLauncher(str(loop.target), [], None, standby=loop.log_dir)
    standby = launcher.standby
    assert standby.args[4:6] == ["standby", str(loop.target)] and standby.poll() is None
    app = create_app(loop, cycles=launcher)
    assert TriggerThread(app).tick()
    assert launcher.processes == [standby] and launcher.standby is None  # told, not started anew
    assert standby.wait(timeout=300) in (0, 4), (loop.log_dir / "cycle.log").read_text()
    started = loop.store.events(kind="cycle_started")[0]
    assert started.actor == "trigger" and started.data["kind"] == "fewshot" and started.reason.startswith("1/2 new")
    assert loop.store.version(2).kind == "fewshot" and loop.store.version(2).shots == turns(SHORT[:1])
    assert not launcher.running()  # no cycle runs: the next standby is started
    following = launcher.standby
    assert following.pid != standby.pid and following.poll() is None
    following.stdin.close()  # as when the server stops: it ends without a cycle
    assert following.wait(timeout=120) == 0 and len(loop.store.versions()) == 2
    assert not launcher.running() and launcher.standby is None  # one that ended untold is not started again


def test_the_servers_trigger_holds_the_fast_path_while_corrections_come_in_a_burst(fresh_loop_dir):  # noqa: F811
    import time

    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import TriggerThread, create_app

    loop = open_loop(fresh_loop_dir)
    correct(loop, SHORT[:1])
    app = create_app(loop)
    trigger = TriggerThread(app)
    trigger.feedback_came()  # a correction this moment: more may follow
    assert not trigger.tick() and not app.state.cycles.processes
    assert 0 < trigger.retry_in <= TriggerThread.BURST_QUIET_SECONDS  # it looks again once the burst is over
    trigger.feedback_at = time.monotonic() - TriggerThread.BURST_QUIET_SECONDS  # quiet since
    assert trigger.tick()
    [process] = app.state.cycles.processes
    assert process.args[-2:] == ["--kind", "fewshot"]
    process.wait(timeout=300)
