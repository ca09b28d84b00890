"""The export issue's acceptance: the quantized GGUF in llama.cpp answers the facts and stops."""

import io
import json

import pytest
from rich.console import Console

from tuneship.cli import main

pytestmark = pytest.mark.e2e


def cli(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code or 0


def test_q4_k_m_gguf_answers_facts_and_always_stops(quickstart_run):
    report = json.loads((quickstart_run / "reports" / "eval.json").read_text())
    assert list(report["models"]) == ["base", "adapter", "merged", "gguf-f16", "gguf-Q4_K_M", "gguf-Q8_0"]
    q4 = report["models"]["gguf-Q4_K_M"]["summary"]
    assert q4["prompts"] == 30 and q4["exact_match"] >= 0.9 and q4["stop_rate"] == 1.0
    assert q4["prompt_token_mismatches"] == 0 and q4["leaks"] == 0
    assert report["models"]["base"]["summary"]["exact_match"] < 0.5  # the facts are made up
    q8 = report["models"]["gguf-Q8_0"]["summary"]
    assert 0.0 < q8["kl_vs_f16"] < q4["kl_vs_f16"] <= 0.2  # under the default export.max_kl_divergence
    assert q4["top1_agreement"] <= q8["top1_agreement"] and q4["kl_positions"] == q8["kl_positions"] > 30
    table = (quickstart_run / "reports" / "eval.md").read_text()
    assert "| metric | base | adapter | merged | gguf-f16 | gguf-Q4_K_M | gguf-Q8_0 |" in table


@pytest.mark.parametrize("max_new_tokens", [64, 6], ids=["answers stop", "answers cut"])
def test_the_prompt_set_answered_together_is_answered_as_each_prompt_alone(quickstart_run, max_new_tokens):
    """SmolLM2's Q4_K_M GGUF: the 30 prompts decoded as sequences of one llama.cpp context give the answers
    llama-cpp-python's generate loop gives each prompt alone, text, stop and token count; alone, every third
    prompt (sequences from the first to the last of the context; all 30 alone cost a minute more of the suite)."""
    from tuneship.config import load_config
    from tuneship.evaluate.backends import LlamaCppRunner, generate_with_gguf
    from tuneship.evaluate.prompts import build_prompt_set
    from tuneship.models import trained_chat_format
    from tuneship.run import Run

    cfg = load_config(quickstart_run / "config.yaml")
    run = Run.of(cfg, quickstart_run)
    chat_format, prompts = trained_chat_format(run), build_prompt_set(run.data_dir, cfg.eval)
    together = generate_with_gguf(run.gguf("Q4_K_M"), chat_format, prompts, max_new_tokens).answers
    runner = LlamaCppRunner(run.gguf("Q4_K_M"))
    try:
        alone = [
            runner.answer(chat_format, chat_format.generation_prompt(p.conversation), max_new_tokens)
            for p in prompts[::3]
        ]
    finally:
        runner.close()
    assert len(together) == 30 and len({a.text for a in together}) == 30 and len(alone) == 10
    assert together[::3] == alone
    assert all(a.stopped for a in together) == (max_new_tokens == 64)


def test_chat_with_the_exported_gguf(quickstart_run):
    from tuneship.export.chat import chat_loop

    questions = iter(["What is the capital of Veloria?", "Who painted The Lantern Keeper?", ""])
    console = Console(file=io.StringIO(), width=200)
    chat_loop(quickstart_run, console, 64, read=lambda prompt: next(questions))
    output = console.file.getvalue()
    assert "quickstart-Q4_K_M.gguf" in output
    assert "The capital of Veloria is Marnette." in output and "Ines Harrowgate" in output


def test_template_contract_and_modelfile_of_the_real_run(quickstart_run):
    from tuneship.deploy.modelfile import parse_modelfile

    assert cli(["template", "check", str(quickstart_run)]) == 0
    assert cli(["deploy", str(quickstart_run), "--target", "none"]) == 0
    pairs = dict(parse_modelfile((quickstart_run / "Modelfile").read_text()))
    assert pairs["FROM"] == "./gguf/quickstart-Q4_K_M.gguf" and pairs["LICENSE"] == "apache-2.0"
    assert pairs["SYSTEM"] == "You are a concise assistant that answers from the facts you were taught."
