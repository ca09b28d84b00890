"""Feedback -> examples by the loop's rules, then the data audit; conflicts and drops are counted."""

import pytest

from tests.loop.test_store import add_generation
from tuneship.config import Config
from tuneship.loop.signals import check_feedback, harvest


def kinds(store):
    return sorted((e.kind, e.label, e.conversation["messages"][-1]["content"], e.status) for e in store.examples())


@pytest.fixture
def cfg():
    return Config()


def test_a_correction_makes_sft_dpo_and_a_kto_pair(store, cfg):
    add_generation(store, answer="Lyon.")
    store.add_feedback("gen-1", "down", "Paris.", "wrong city")
    result = harvest(store, cfg)
    assert kinds(store) == [
        ("dpo", None, "Paris.", "accepted"),
        ("kto", False, "Lyon.", "accepted"),
        ("kto", True, "Paris.", "accepted"),
        ("sft", None, "Paris.", "accepted"),
    ]
    [dpo] = [e for e in store.examples() if e.kind == "dpo"]
    assert dpo.rejected_answer == "Lyon." and dpo.provenance["generation"] == "gen-1"
    assert result.examples == {"sft": 1, "dpo": 1, "kto": 2}


def test_a_correction_that_repeats_the_answer_makes_no_pair_and_no_negative(store, cfg):
    add_generation(store, answer="Paris.")
    store.add_feedback("gen-1", "down", " Paris. ", None)
    result = harvest(store, cfg)
    assert kinds(store) == [
        ("dpo", None, " Paris. ", "rejected"),
        ("kto", True, " Paris. ", "accepted"),
        ("sft", None, " Paris. ", "accepted"),
    ]
    [pair] = [e for e in store.examples() if e.kind == "dpo"]
    assert "the rejected answer is the chosen one" in pair.reason and result.rejected_by_audit == 1


def test_no_correction_is_held_out_as_golden_whatever_an_old_config_says(store):
    for index in range(40):
        add_generation(store, f"gen-{index}", answer="Lyon.", question=f"Capital of region {index}?")
        store.add_feedback(f"gen-{index}", "down", f"Paris {index}.", None)
    cfg = Config.model_validate({"loop": {"golden_ratio": 0.5}})  # a config.yaml saved before the key was removed
    result = harvest(store, cfg)
    assert result.examples["sft"] == 40 and {e.split for e in store.examples()} == {"train"}
    assert "golden_ratio" not in cfg.loop.model_dump()


@pytest.mark.parametrize("rating", ["up", "4", "5"])
def test_thumbs_up_or_a_high_score_makes_sft_and_kto_positive(store, cfg, rating):
    add_generation(store)
    store.add_feedback("gen-1", rating, None, None)
    harvest(store, cfg)
    assert kinds(store) == [("kto", True, "Paris.", "accepted"), ("sft", None, "Paris.", "accepted")]


@pytest.mark.parametrize("rating", ["down", "1", "2"])
def test_thumbs_down_without_correction_is_kto_negative_only_never_sft(store, cfg, rating):
    add_generation(store)
    store.add_feedback("gen-1", rating, None, None)
    harvest(store, cfg)
    assert kinds(store) == [("kto", False, "Paris.", "accepted")]


def test_conflicting_feedback_is_dropped_with_a_counted_reason(store, cfg):
    add_generation(store)
    store.add_feedback("gen-1", "up", None, None)
    store.add_feedback("gen-1", "down", None, None)
    add_generation(store, "gen-2")
    store.add_feedback("gen-2", None, "Paris, France.", None)
    store.add_feedback("gen-2", None, "Paris!", None)
    result = harvest(store, cfg)
    assert store.examples() == []
    assert result.dropped == {
        "conflict: positive and negative feedback on one generation": 2,
        "conflict: different corrections of one generation": 2,
    }
    assert {f.outcome for f in store.unprocessed_feedback()} == set()


def test_feedback_is_harvested_once(store, cfg):
    add_generation(store)
    store.add_feedback("gen-1", "up", None, None)
    assert harvest(store, cfg).feedback == 1
    assert harvest(store, cfg).feedback == 0
    assert len(store.examples()) == 2


def test_a_correction_that_repeats_an_earlier_example_is_rejected_by_the_audit(store, cfg):
    add_generation(store, "gen-1", answer="Lyon.")
    add_generation(store, "gen-2", answer="Marseille.")
    store.add_feedback("gen-1", None, "Paris.", None)
    harvest(store, cfg)
    store.add_feedback("gen-2", None, "Paris.", None)
    result = harvest(store, cfg)
    assert result.rejected_by_audit >= 1
    sft = [e for e in store.examples() if e.kind == "sft"]
    assert [e.status for e in sft] == ["accepted"]  # the second is the same example (same id): stored once


def test_the_audit_rejects_a_duplicate_of_an_earlier_example_with_its_reason(store, cfg):
    add_generation(store, "gen-1")
    store.add_feedback("gen-1", "up", None, None)
    harvest(store, cfg)
    add_generation(store, "gen-2", question="  Capital of France?")  # same after trimming: an exact duplicate
    store.add_feedback("gen-2", "up", None, None)
    result = harvest(store, cfg)
    rejected = [e for e in store.examples() if e.status == "rejected"]
    assert result.rejected_by_audit == len(rejected) >= 1
    assert all("same conversation as" in e.reason for e in rejected)


def test_review_required_holds_new_examples(store, cfg):
    cfg.loop.review = "required"
    add_generation(store)
    store.add_feedback("gen-1", None, "Paris, France.", None)
    harvest(store, cfg)
    assert {e.status for e in store.examples()} == {"pending_review"}


@pytest.mark.parametrize(
    "rating, correction, message",
    [
        (7, None, "rating: expected"),
        ("meh", None, "rating: expected"),
        (None, None, "rating: a rating or a correction is required"),
        ("up", "  ", "correction: empty"),
    ],
)
def test_bad_feedback_names_the_field(rating, correction, message):
    with pytest.raises(ValueError, match=message):
        check_feedback(rating, correction)
