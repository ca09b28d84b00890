"""The gate's decision, prompt by prompt, from the answers of champion and challenger."""

from tuneship.config import LoopSection
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.evaluate.checks import check_answer, summarize
from tuneship.evaluate.prompts import EvalPrompt
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
