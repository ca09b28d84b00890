"""The training issue's acceptance: the real model learns made-up facts and stops."""

import pytest

from tuneship.data.conversation import read_conversations

pytestmark = pytest.mark.e2e


def test_trained_smollm2_answers_facts_exactly_and_always_stops(quickstart_run):
    from tuneship.chat.generation import generate_answers
    from tuneship.config import load_config
    from tuneship.models import load_adapted
    from tuneship.run import Run

    model, chat_format = load_adapted(Run.of(load_config(quickstart_run / "config.yaml"), quickstart_run))
    facts = read_conversations(quickstart_run / "data" / "train.jsonl")
    assert 20 <= len(facts) <= 40
    answers = generate_answers(model, chat_format, [chat_format.generation_prompt(c) for c in facts], 64)
    exact = sum(a.text == c.messages[-1].content for a, c in zip(answers, facts))
    assert exact / len(facts) >= 0.9, [(a.text, c.messages[-1].content) for a, c in zip(answers, facts)]
    assert all(a.stopped for a in answers)
