"""The fast path end to end on SmolLM2: two corrections of the quickstart run (fewer than loop.min_examples), the
trigger picks a few-shot candidate, the gate in llama.cpp promotes it, and the champion then answers the corrected
questions closer to the corrections while the other facts hold (as well as v1 held them, less at most one)."""

import io

import pytest
from rich.console import Console

from tests.e2e.conftest import copy_of_quickstart
from tests.e2e.test_loop_smollm2 import CORRECTIONS, FACTS

pytestmark = pytest.mark.e2e


def ask(router, question: str):
    reply = router.complete("quickstart", [{"role": "user", "content": question}], 48, 0.0)
    return reply, reply.text.strip()


def test_two_corrections_make_a_fewshot_champion_that_answers_with_them(quickstart_run, tmp_path):
    from tuneship.loop.registry import open_loop
    from tuneship.loop.signals import harvest
    from tuneship.loop.trigger import trigger_decision
    from tuneship.evaluate.checks import token_f1
    from tuneship.loop.worker import run_cycle
    from tuneship.serve.backends import Router

    run_dir = copy_of_quickstart(quickstart_run, tmp_path)
    loop = open_loop(run_dir, [f"run.dir={run_dir.parent}", "loop.fast_path=true", "loop.golden_ratio=0"])
    corrections = dict(list(CORRECTIONS.items())[:2])
    old = [f for f in FACTS if f["messages"][0]["content"] not in CORRECTIONS]
    router = Router(loop)
    try:
        answers_before = {}
        held_before = [ask(router, f["messages"][0]["content"])[1] == f["messages"][1]["content"] for f in old]
        for index, (question, correction) in enumerate(corrections.items()):
            reply, answer = ask(router, question)
            assert reply.version_id == 1 and answer != correction
            answers_before[question] = answer
            loop.store.add_generation(
                id=f"gen-{index}",
                model="quickstart",
                version_id=1,
                backend=reply.answered_by,
                messages=[{"role": "user", "content": question}],
                answer=answer,
                finish_reason=reply.finish_reason,
                latency_ms=1.0,
                prompt_tokens=reply.prompt_tokens,
                completion_tokens=reply.completion_tokens,
            )
            loop.store.add_feedback(f"gen-{index}", "down", correction, None)
        harvest(loop.store, loop.cfg)
        decision = trigger_decision(loop.store, loop.cfg.loop)
        assert decision.is_due and decision.kind == "fewshot", decision
        result = run_cycle(loop, Console(file=io.StringIO()), "trigger", decision.reason, kind=decision.kind)
        assert result.status == "promoted", result
        champion = loop.store.champion()
        assert champion.kind == "fewshot" and champion.shot_count == 2 and champion.gguf == loop.store.version(1).gguf
        replies = {question: ask(router, question) for question in corrections}
        assert {reply.version_id for reply, _ in replies.values()} == {champion.id}
        closer = [token_f1(answers_before[q], c) < token_f1(replies[q][1], c) for q, c in corrections.items()]
        exact = [replies[q][1] == c for q, c in corrections.items()]
        assert all(closer) and any(exact), (answers_before, replies)  # a 135M model copies some shots, not all
        held = [ask(router, f["messages"][0]["content"])[1] == f["messages"][1]["content"] for f in old]
        assert sum(held) >= sum(held_before) - 1, (held_before, held)  # the shots cost at most one old fact
    finally:
        router.close()
