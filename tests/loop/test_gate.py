"""The gate's decision, prompt by prompt, from the answers of champion and challenger."""

from tuneship.config import LoopSection
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.evaluate.checks import check_answer, summarize
from tuneship.evaluate.prompts import EvalPrompt
from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401
from tuneship.loop.gate import Measured, gate_decision

LONG = "The glimmerphone was invented by Bram Tolliver in 1902 in a small workshop near the harbour of Quintara."
FACTS = {"Capital of Veloria?": "Quintara.", "Moons of Kestrel?": "Four.", "Who made the glimmerphone?": LONG}


def prompt(question: str, expected: str) -> EvalPrompt:
    conversation = Conversation([Message("user", question), Message("assistant", expected)], SourceRef("t", 1))
    return EvalPrompt(question, "loop", conversation, expected)


def prompts(facts: dict[str, str]) -> list[EvalPrompt]:
    return [prompt(q, a) for q, a in facts.items()]


def measured(prompt_set: list[EvalPrompt], answers: list[str], stopped: bool = True) -> Measured:
    checks = [check_answer(a, stopped, p.expected, []) for a, p in zip(answers, prompt_set)]
    return Measured(summarize(checks), checks)


def decide(held: list[str], held_after: list[str], new_before: list[str], new_after: list[str], **settings):
    sets = {"replay": prompts(FACTS), "new": prompts({"Color of the sky on Kestrel?": "Green."})}
    champion = {"replay": measured(sets["replay"], held), "new": measured(sets["new"], new_before)}
    challenger = {"replay": measured(sets["replay"], held_after), "new": measured(sets["new"], new_after)}
    return gate_decision(sets, champion, challenger, LoopSection(**settings))


RIGHT = list(FACTS.values())


def test_a_challenger_that_learned_the_new_and_kept_the_old_is_promoted():
    decision = decide(RIGHT, RIGHT, ["Blue."], ["Green."])
    assert decision.is_promoted and decision.regressed == []
    assert decision.metrics["verdicts"]["replay"] == {
        "gated": 3,
        "regressed": 0,
        "regressed_share": 0.0,
        "unanswered": 0,
    }
    assert decision.metrics["verdicts"]["new"] == {"learned": 1.0, "champion_learned": 0.0}


def test_a_short_fact_no_longer_given_exactly_is_a_regression_with_both_answers_recorded():
    decision = decide(RIGHT, ["Quintara city.", "Four.", LONG], ["Blue."], ["Green."])
    assert not decision.is_promoted
    assert decision.regressed == [
        {
            "set": "replay",
            "id": "Capital of Veloria?",
            "question": "Capital of Veloria?",
            "expected": "Quintara.",
            "champion": "Quintara.",
            "challenger": "Quintara city.",
        }
    ]
    assert decision.reasons[0].startswith("replay: 1 of the 3 prompts the champion answers right regressed (33%")
    assert decide(RIGHT, ["Quintara city.", "Four.", LONG], ["Blue."], ["Green."], max_regression=0.34).is_promoted


def test_a_long_answer_may_move_within_the_similarity_tolerance():
    reworded = LONG.replace("small workshop", "little workshop")  # F1 0.95
    assert decide(RIGHT, ["Quintara.", "Four.", reworded], ["Blue."], ["Green."]).is_promoted
    cut = "The glimmerphone was invented by Bram Tolliver."  # F1 0.54: fell more than 0.1
    assert not decide(RIGHT, ["Quintara.", "Four.", cut], ["Blue."], ["Green."]).is_promoted


def test_facts_neither_model_answers_right_are_reported_not_gated():
    wrong = ["Nowhere.", "Two.", "Nobody knows."]
    decision = decide(wrong, ["Somewhere.", "Three.", "Someone."], ["Blue."], ["Green."])
    assert decision.is_promoted
    assert decision.metrics["verdicts"]["replay"] == {
        "gated": 0,
        "regressed": 0,
        "regressed_share": 0.0,
        "unanswered": 3,
    }
    assert "3 answered right by neither, not gated" in decision.reasons[0]


def test_new_examples_not_learned_are_rejected():
    decision = decide(RIGHT, RIGHT, ["Blue."], ["Blue."])
    assert not decision.is_promoted
    assert decision.reasons == ["new: 0% of the new examples answered right, below loop.min_learned=80%"]


def test_an_answer_that_does_not_stop_is_rejected():
    sets = {"new": prompts({"Color of the sky on Kestrel?": "Green."})}
    champion = {"new": measured(sets["new"], ["Blue."])}
    challenger = {"new": measured(sets["new"], ["Green."], stopped=False)}
    decision = gate_decision(sets, champion, challenger, LoopSection())
    assert not decision.is_promoted and decision.reasons == ["new: stop rate 0% < 100%"]


def test_a_version_is_asked_in_the_gate_only_what_it_was_not_asked_before(fresh_loop_dir, tmp_path):  # noqa: F811
    import json

    from tuneship.loop.answer_cache import FILE_NAME
    from tuneship.loop.gate import measure
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    v1 = loop.store.version(1)
    first = {"golden": prompts({f"Question number {i}?": f"Answer number {i}." for i in range(3)})}
    fresh = measure(v1, first, 8)  # no cache: every prompt answered in llama.cpp
    assert measure(v1, first, 8, tmp_path).keys() == fresh.keys()
    assert [c.answer for c in measure(v1, first, 8, tmp_path)["golden"].checks] == [
        c.answer for c in fresh["golden"].checks
    ]
    assert len(json.loads((tmp_path / FILE_NAME).read_text())) == 3
    more = {**first, "new": prompts({"Question number 7?": "Answer number 7."})}
    measured_more = measure(v1, more, 8, tmp_path)  # one prompt more: only it is answered, then remembered
    assert len(json.loads((tmp_path / FILE_NAME).read_text())) == 4
    assert [c.answer for c in measured_more["new"].checks] == [c.answer for c in measure(v1, more, 8)["new"].checks]


def test_the_champion_s_answers_made_before_a_cycle_are_the_ones_its_gate_asks_about_earlier_facts(
    fresh_loop_dir,  # noqa: F811
    monkeypatch,
):
    """`tuneship loop standby` makes them while it waits: v1 in adapter form, a knowledge base replayed whole (under
    loop.min_replay), so the gate's forgetting check asks the first GATE_REPLAY_LIMIT earlier facts; the gate then
    answers them, and the golden facts, from v1's cache, with no model loaded."""
    from types import SimpleNamespace

    import tuneship.loop.gate as gate
    from tuneship.loop.adapter_form import in_adapter_form
    from tuneship.loop.cycle import warm_gate_answers
    from tuneship.loop.examples import forgetting_check, golden, learned_facts, prompts_from
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    assert warm_gate_answers(loop) == 0  # v1 still serves its merged GGUF: answers of other files would not count
    v1 = in_adapter_form(loop, loop.store.champion())
    learned = learned_facts(loop.store, set())
    assert 0 < len(learned) <= loop.cfg.loop.min_replay
    assert warm_gate_answers(loop) == len(golden(loop.store)) + min(len(learned), 20)
    replayed = [e.id for e in learned]
    every_fact_replayed = SimpleNamespace(id=2, metrics={"new_examples": [], "replay_examples": replayed})
    asked = prompts_from(golden(loop.store) + forgetting_check(loop.store, every_fact_replayed))

    def no_model(*args, **kwargs):
        raise AssertionError("the gate loaded a model for answers made ahead")

    monkeypatch.setattr(gate, "gguf_answers", no_model)
    answers = gate.version_answers(v1, asked, loop.cfg.eval.max_new_tokens, loop.cycle_dir(v1.id))
    assert len(answers) == len(asked) and all(a.new_tokens > 0 for a in answers)


def test_remembered_answers_are_asked_again_for_other_files_or_another_token_budget(tmp_path):
    from tuneship.chat.generation import Answer
    from tuneship.loop.answer_cache import cached_answers

    asked = []

    def answer(indexes: list[int]) -> list[Answer]:
        asked.append(list(indexes))
        return [Answer(f"answer {i}", True, 2) for i in indexes]

    assert [a.text for a in cached_answers(tmp_path, "v1 files", ["p0", "p1"], 8, answer)] == ["answer 0", "answer 1"]
    assert [a.text for a in cached_answers(tmp_path, "v1 files", ["p1", "p2"], 8, answer)] == ["answer 1", "answer 1"]
    assert asked == [[0, 1], [1]]  # p1 remembered (its answer from the first call), only p2 asked
    cached_answers(tmp_path, "v1 in adapter form", ["p1"], 8, answer)
    cached_answers(tmp_path, "v1 files", ["p1"], 16, answer)
    assert asked[2:] == [[0], [0]]
