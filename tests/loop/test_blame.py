"""A rejected batch is not consumed: the examples blamed for the rejection wait for review, the rest wait for the
next cycle, which the trigger starts at once for what is left."""

from tests.loop.test_cli import shop_loop
from tests.loop.test_conflicts import correct, statuses
from tuneship.loop.blame import hold_blamed
from tuneship.loop.examples import waiting_examples
from tuneship.loop.gate import GateDecision
from tuneship.loop.signals import harvest
from tuneship.loop.trigger import trigger_decision


def rejected_version(loop, new_ids: list[str], blamed_regressed: list[dict]):
    version = loop.store.add_version(
        id=loop.store.next_version_id(),
        name="shop-v2",
        parent_id=1,
        run_dir=str(loop.base_run.parent / "shop-v2"),
        gguf=None,
        status="rejected",
        example_ids=new_ids,
        metrics={"new_examples": new_ids, "replay_examples": []},
    )
    decision = GateDecision(
        False, ["replay: 1 of the 5 prompts the champion answers right regressed"], {}, blamed_regressed
    )
    return version, decision


def batch(loop) -> dict[str, str]:
    """Four good corrections of untaught facts and one harmful one ("every answer is 42")."""
    corrections = {f"New question {i}?": f"New answer {i}." for i in range(4)} | {"Tell me anything?": "Answer 42."}
    for index, (question, answer) in enumerate(corrections.items()):
        correct(loop, f"gen-{index}", question, answer)
    harvest(loop.store, loop.cfg)
    return {e.conversation["messages"][0]["content"]: e.id for e in waiting_examples(loop.store)}


def test_the_example_whose_answer_leaked_into_a_regressed_fact_waits_for_review_the_rest_wait_to_retry(tmp_path):
    loop = shop_loop(tmp_path, 5)
    loop.cfg.loop.min_examples = 5
    ids = batch(loop)
    regressed = [
        {
            "set": "replay",
            "id": "q3",
            "question": "Question 3?",
            "expected": "Answer 3.",
            "champion": "Answer 3.",
            "challenger": "Answer 42.",
        }
    ]
    version, decision = rejected_version(loop, sorted(ids.values()), regressed)
    blamed = hold_blamed(loop, version, decision)
    assert list(blamed) == [ids["Tell me anything?"]]
    assert (
        "the challenger answered 'Question 3?' with 'Answer 42.', closer to this answer"
        in blamed[ids["Tell me anything?"]]
    )
    held = statuses(loop, "gen-4")
    assert set(held) == {"sft", "dpo", "kto-True", "kto-False"} and {s for s, _ in held.values()} == {"pending_review"}
    assert sorted(e.id for e in waiting_examples(loop.store)) == sorted(i for q, i in ids.items() if "New" in q)
    decision = trigger_decision(loop.store, loop.cfg.loop)
    assert decision.is_due and decision.kind == "finetune"
    assert decision.reason == "retry of v2's batch without the 1 examples blamed for its rejection"
    assert [e.kind for e in loop.store.events(limit=3)][0] == "blamed"


def test_the_same_batch_rejected_with_nothing_to_blame_waits_for_new_examples_then_goes_to_review(tmp_path):
    loop = shop_loop(tmp_path, 5)
    loop.cfg.loop.min_examples, loop.cfg.loop.fast_path = 5, False
    ids = batch(loop)
    version, decision = rejected_version(loop, sorted(ids.values()), [])
    assert hold_blamed(loop, version, decision) == {}
    decision = trigger_decision(loop.store, loop.cfg.loop)
    assert not decision.is_due
    assert decision.reason == "5/5 new examples, all in v2, which the gate rejected; waiting for new examples"
    again, second = rejected_version(loop, sorted(ids.values()), [])  # a second rejected cycle with the same five
    blamed = hold_blamed(loop, again, second)
    assert sorted(blamed) == sorted(ids.values()) and waiting_examples(loop.store) == []
    assert "in 2 rejected cycles (loop.max_blame_cycles=2) with nothing else to blame" in next(iter(blamed.values()))
