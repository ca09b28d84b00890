"""The gate's decision from the numbers of champion and challenger."""

from tuneship.loop.gate import gate_decision


def summary(stop=1.0, exact=0.5, f1=0.6):
    return {"prompts": 4, "stop_rate": stop, "exact_match": exact, "f1": f1, "answers": ["a"] * 4}


def sets(golden=None, replay=None, new=None):
    return {"golden": golden or summary(), "replay": replay or summary(), "new": new or summary(exact=0.0, f1=0.1)}


def test_a_challenger_better_on_new_and_equal_elsewhere_is_promoted():
    decision = gate_decision(sets(), sets(new=summary(exact=1.0, f1=1.0)), max_regression=0.0)
    assert decision.is_promoted
    assert decision.metrics["challenger"]["new"]["f1"] == 1.0 and "answers" not in decision.metrics["champion"]["new"]


def test_not_better_on_the_new_examples_is_rejected():
    decision = gate_decision(sets(), sets(), max_regression=0.0)
    assert not decision.is_promoted and decision.reasons == ["new: F1 0.100 is not better than the champion's 0.100"]


def test_a_golden_regression_beyond_the_allowance_is_rejected():
    challenger = sets(golden=summary(exact=0.25), new=summary(f1=1.0))
    assert not gate_decision(sets(), challenger, max_regression=0.2).is_promoted
    assert gate_decision(sets(), challenger, max_regression=0.25).is_promoted


def test_forgetting_replayed_facts_is_rejected():
    decision = gate_decision(sets(), sets(replay=summary(f1=0.3), new=summary(f1=1.0)), max_regression=0.1)
    assert not decision.is_promoted and decision.reasons[0].startswith("replay: f1 0.300 fell 0.300")


def test_an_answer_that_does_not_stop_is_rejected():
    decision = gate_decision(sets(), sets(golden=summary(stop=0.75), new=summary(f1=1.0)), max_regression=0.0)
    assert not decision.is_promoted and decision.reasons == ["golden: stop rate 75% < 100%"]
