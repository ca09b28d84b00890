"""loop.review: conflicts (the default): feedback that contradicts a taught or golden fact waits for review with both
answers; corrections of what the model was never taught go straight in."""

from tests.conftest import qa, write_jsonl
from tests.loop.test_cli import shop_loop
from tests.loop.test_store import add_generation
from tuneship.loop.examples import waiting_examples
from tuneship.loop.signals import harvest


def correct(loop, generation_id: str, question: str, correction: str | None, rating: str = "down") -> None:
    add_generation(loop.store, generation_id, answer="I do not know.", question=question)
    loop.store.add_feedback(generation_id, rating, correction, None)


def statuses(loop, generation_id: str) -> dict[str, tuple[str, str | None]]:
    return {
        e.kind + ("-" + str(e.label) if e.label is not None else ""): (e.status, e.reason)
        for e in loop.store.examples()
        if (e.provenance or {}).get("generation") == generation_id
    }


def test_a_correction_of_a_taught_fact_waits_for_review_with_both_answers_and_where_it_was_taught(tmp_path):
    loop = shop_loop(tmp_path, 5)
    correct(loop, "gen-wrong", "Question 3?", "Answer 33.")
    correct(loop, "gen-new", "Question 7?", "Answer 7.")
    result = harvest(loop.store, loop.cfg)
    held = statuses(loop, "gen-wrong")
    reason = "conflicts with f:3: taught answer 'Answer 3.', this answer 'Answer 33.'"
    assert set(held) == {"sft", "dpo", "kto-True", "kto-False"} and set(held.values()) == {("pending_review", reason)}
    assert {status for status, _ in statuses(loop, "gen-new").values()} == {"accepted"}
    assert [e.conversation["messages"][0]["content"] for e in waiting_examples(loop.store)] == ["Question 7?"]
    assert result.held_for_review == 1


def test_a_near_duplicate_prompt_of_a_taught_fact_is_a_conflict_too(tmp_path):
    loop = shop_loop(tmp_path, 5)
    correct(loop, "gen-1", "question 2", "Answer 22.")  # the audit's near-duplicate check: the same words
    harvest(loop.store, loop.cfg)
    assert statuses(loop, "gen-1")["sft"] == (
        "pending_review",
        "conflicts with f:2: taught answer 'Answer 2.', this answer 'Answer 22.'",
    )


def test_a_thumbs_up_that_agrees_with_the_taught_answer_is_no_conflict(tmp_path):
    loop = shop_loop(tmp_path, 5)
    add_generation(loop.store, "gen-up", answer="Answer 1.", question="Question 1?")
    loop.store.add_feedback("gen-up", "up", None, None)
    result = harvest(loop.store, loop.cfg)
    assert result.held_for_review == 0 and "pending_review" not in {s for s, _ in statuses(loop, "gen-up").values()}


def test_a_correction_of_a_golden_fact_waits_for_review(tmp_path):
    write_jsonl(
        tmp_path / "runs" / "shop" / "data" / "eval.jsonl",
        [{**qa("Capital of Veloria?", "Quintara."), "source": {"file": "facts.jsonl", "line": 9}}],
    )
    loop = shop_loop(tmp_path, 2)
    correct(loop, "gen-1", "Capital of Veloria?", "Zandria.")
    harvest(loop.store, loop.cfg)
    status, reason = statuses(loop, "gen-1")["sft"]
    assert status == "pending_review" and reason.startswith("conflicts with golden (facts.jsonl:9)")
    assert "taught answer 'Quintara.', this answer 'Zandria.'" in reason


def test_with_review_auto_a_conflicting_correction_goes_straight_in(tmp_path):
    loop = shop_loop(tmp_path, 5)
    loop.cfg.loop.review = "auto"
    correct(loop, "gen-1", "Question 3?", "Answer 33.")
    assert harvest(loop.store, loop.cfg).held_for_review == 0
    assert statuses(loop, "gen-1")["sft"] == ("accepted", None)


def test_an_approved_conflict_supersedes_the_taught_answer_and_updates_the_golden_fact_with_an_event(tmp_path):
    from tuneship.loop.approval import review_examples
    from tuneship.loop.examples import golden, learned_facts

    write_jsonl(
        tmp_path / "runs" / "shop" / "data" / "eval.jsonl",
        [{**qa("Capital of Veloria?", "Quintara."), "source": {"file": "facts.jsonl", "line": 9}}],
    )
    loop = shop_loop(tmp_path, 5)
    correct(loop, "gen-taught", "Question 3?", "Answer 33.")
    correct(loop, "gen-golden", "Capital of Veloria?", "Zandria.")
    harvest(loop.store, loop.cfg)
    pending = [e.id for e in loop.store.examples(status="pending_review")]
    assert review_examples(loop, pending, "approve", "reviewer") == len(pending) == 8
    assert [e.conversation["messages"][-1]["content"] for e in golden(loop.store)] == ["Zandria."]
    assert {e.conversation["messages"][-1]["content"] for e in waiting_examples(loop.store)} == {
        "Answer 33.",
        "Zandria.",
    }
    assert "Answer 3." not in {e.conversation["messages"][-1]["content"] for e in learned_facts(loop.store, set())}
    kinds = {e.kind: e.actor for e in loop.store.events(limit=5)}
    assert kinds["approved"] == "reviewer" and kinds["golden_updated"] == "reviewer"
