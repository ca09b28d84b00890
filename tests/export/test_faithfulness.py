"""Quant faithfulness on real llama.cpp logits: a tiny Llama exported to f16, Q8_0, Q4_K_M and a damaged copy."""

import copy
import shutil
from pathlib import Path

import pytest

from tuneship.config import load_config
from tuneship.errors import ConfigError
from tuneship.export.faithfulness import (
    Faithfulness,
    ScoredSequence,
    _answer_log_probs,
    _llama,
    greedy_sequences,
    kl_gate_failures,
    measure_faithfulness,
)
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.export.gguf import convert_to_gguf, quantize

MAX_NEW_TOKENS = 5


def save_variant(source: str, target: Path, change) -> Path:
    """The tiny model with its weights changed by `change(model)`, tokenizer files copied."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        change(model)
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(source) / name, target / name)
    return target


def sharpen(model) -> None:
    """Scale the final norm so next-token distributions are peaked like a trained model's, not flat."""
    model.model.norm.weight.mul_(30.0)


def damage(model) -> None:
    import torch

    sharpen(model)
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for weight in (layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight):
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * 2)


@pytest.fixture(scope="module")
def ggufs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faithfulness")
    sharp = save_variant(tiny_model_dir, folder / "sharp", sharpen)
    files = {"f16": convert_to_gguf(sharp, folder / "tiny-f16.gguf", "f16")}
    for quant in ("Q8_0", "Q4_K_M"):
        files[quant] = quantize(files["f16"], folder / f"tiny-{quant}.gguf", quant)
    damaged = save_variant(tiny_model_dir, folder / "damaged", damage)
    files["damaged"] = convert_to_gguf(damaged, folder / "damaged-f16.gguf", "f16")
    return files


@pytest.fixture(scope="module")
def chat_format(tiny_model_dir):
    from tuneship.chat.format import ChatFormat
    from tuneship.config import ChatSection

    return ChatFormat.from_model_dir(tiny_model_dir, ChatSection())


@pytest.fixture(scope="module")
def prompts() -> list[EvalPrompt]:
    return [
        EvalPrompt(
            f"prompts:{i}", "prompts", Conversation([Message("user", f"Question {i}?")], SourceRef("q", i)), None
        )
        for i in range(4)
    ]


@pytest.fixture(scope="module")
def sequences(ggufs, chat_format, prompts) -> list[ScoredSequence]:
    return greedy_sequences(ggufs["f16"], chat_format, prompts, MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def measured(ggufs, sequences) -> dict[str, Faithfulness]:
    """f16 (itself), Q8_0, Q4_K_M and the damaged model, each against the f16 GGUF."""
    return measure_faithfulness(ggufs["f16"], ggufs, sequences)


def test_sequences_are_the_rendered_prompt_then_the_f16_greedy_answer(ggufs, chat_format, prompts, sequences):
    with _llama(ggufs["f16"]) as llm:
        log_probs = _answer_log_probs(llm, sequences)
    for prompt, sequence, rows in zip(prompts, sequences, log_probs, strict=True):
        rendered = chat_format.encode(chat_format.generation_prompt(prompt.conversation))
        assert sequence.tokens[: sequence.answer_start] == rendered
        assert sequence.positions == MAX_NEW_TOKENS  # the random model never stops
        # the counted positions are those that predict the answer: the f16 argmax is the next token
        assert rows.argmax(axis=1).tolist() == sequence.tokens[sequence.answer_start :]


@pytest.mark.parametrize("one_per_wave", [False, True], ids=["one wave", "a wave per prompt"])
def test_prompts_answered_together_get_the_answers_they_get_one_at_a_time(
    ggufs, chat_format, prompts, monkeypatch, one_per_wave
):
    """All prompts decoded as sequences of one llama.cpp context (their shared start once) answer exactly as
    llama-cpp-python's own generate loop answers each prompt alone, stop tokens included."""
    from tuneship.evaluate import llama_parallel
    from tuneship.evaluate.backends import LlamaCppRunner, generate_with_gguf

    if one_per_wave:
        monkeypatch.setattr(llama_parallel, "KV_BUDGET_BYTES", 1)
    longer = Conversation([Message("user", "A longer question " * 9)], SourceRef("q", 9))
    varied = [*prompts, EvalPrompt("long", "prompts", longer, None)]
    stopping = copy.deepcopy(chat_format)
    stopping.spec.stop_token_ids = [*chat_format.spec.stop_token_ids, 6409]  # the damaged model answers one prompt so
    generation = generate_with_gguf(ggufs["damaged"], stopping, varied, 12)
    runner = LlamaCppRunner(ggufs["damaged"])
    try:
        alone = [runner.answer(stopping, stopping.generation_prompt(p.conversation), 12) for p in varied]
    finally:
        runner.close()
    assert generation.answers == alone
    assert {a.stopped for a in alone} == {True, False}  # both ways an answer ends are compared
    assert generation.prompt_token_mismatches == 0


def test_the_stop_token_ends_the_answer_and_is_measured(ggufs, chat_format, prompts, sequences):
    first_token = sequences[0].tokens[sequences[0].answer_start]
    stopping = copy.deepcopy(chat_format)
    stopping.spec.stop_token_ids = [first_token]
    [sequence] = greedy_sequences(ggufs["f16"], stopping, prompts[:1], MAX_NEW_TOKENS)
    assert sequence.tokens[sequence.answer_start :] == [first_token]


def test_f16_against_itself_has_zero_kl_and_full_top1_agreement(measured, sequences):
    itself = measured["f16"]
    assert itself.kl_divergence == 0.0
    assert itself.top1_agreement == 1.0
    assert itself.positions == sum(len(s.tokens) - s.answer_start for s in sequences)


def test_quants_diverge_from_f16_and_fewer_bits_diverge_more(measured):
    assert 0.0 < measured["Q8_0"].kl_divergence < measured["Q4_K_M"].kl_divergence
    assert measured["Q8_0"].positions == measured["Q4_K_M"].positions == measured["f16"].positions
    assert 0.5 <= measured["Q4_K_M"].top1_agreement <= measured["Q8_0"].top1_agreement <= 1.0


def test_chunked_reference_rows_give_the_same_figures_as_one_chunk(ggufs, sequences, measured):
    one_sequence_per_chunk = measure_faithfulness(
        ggufs["f16"], {"Q4_K_M": ggufs["Q4_K_M"]}, sequences, memory_budget_bytes=1
    )
    # each chunk is its own llama.cpp batch (another KV cache layout, other ubatches): the same figures up to
    # float rounding, which on this tiny model's small KL (about 1e-3) moved it by 0.6 %
    [(name, alone)] = one_sequence_per_chunk.items()
    assert name == "Q4_K_M" and alone.positions == measured[name].positions
    assert alone.kl_divergence == pytest.approx(measured[name].kl_divergence, rel=2e-2)
    assert alone.top1_agreement == measured[name].top1_agreement


def test_damaged_model_fails_the_default_kl_gate_and_good_quants_pass(measured):
    limit = load_config().export.max_kl_divergence
    assert measured["damaged"].kl_divergence > limit > measured["Q4_K_M"].kl_divergence
    [failure] = kl_gate_failures(measured, limit)
    assert failure.startswith(f"gguf-damaged: KL vs f16 {measured['damaged'].kl_divergence:.4f} > ")
    assert f"export.max_kl_divergence {limit}" in failure
    assert kl_gate_failures(measured, None) == []


def test_non_finite_kl_fails_the_gate():
    assert kl_gate_failures({"Q8_0": Faithfulness(float("nan"), 1.0, 10)}, 1.0)


@pytest.mark.parametrize("value", ["0", "-0.1", "11"])
def test_max_kl_divergence_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="export.max_kl_divergence"):
        load_config(overrides=[f"export.max_kl_divergence={value}"])


def test_the_logits_kept_while_generating_give_the_figures_of_scoring_the_reference_again(
    ggufs, chat_format, prompts, measured
):
    from tuneship.evaluate.backends import generate_with_gguf
    from tuneship.export.faithfulness import scored_sequences

    generation = generate_with_gguf(ggufs["f16"], chat_format, prompts, MAX_NEW_TOKENS, keep_logits_bytes=1 << 30)
    sequences = scored_sequences(generation)
    assert [len(rows) for rows in generation.answer_logits] == [s.positions for s in sequences]
    kept = measure_faithfulness(
        ggufs["f16"], {"Q4_K_M": ggufs["Q4_K_M"]}, sequences, reference_logits=generation.answer_logits
    )
    # the generation's batches differ from the scoring batch (one token per step vs whole sequences): the same
    # figures up to float rounding, as between chunkings above
    assert kept["Q4_K_M"].positions == measured["Q4_K_M"].positions
    assert kept["Q4_K_M"].kl_divergence == pytest.approx(measured["Q4_K_M"].kl_divergence, rel=2e-2)
    assert kept["Q4_K_M"].top1_agreement == measured["Q4_K_M"].top1_agreement
    tight = generate_with_gguf(ggufs["f16"], chat_format, prompts, MAX_NEW_TOKENS, keep_logits_bytes=1)
    assert tight.answer_logits is None  # over the budget: none kept, the reference is scored again instead


@pytest.mark.parametrize("quant", ["Q4_K_M", "damaged"])
def test_on_the_served_answers_the_kept_logits_give_the_figures_of_scoring_both_again(
    ggufs, chat_format, prompts, quant
):
    """What a LoRA export measures: the quant's own answers, its logits kept while it generated them, scored by
    the reference; the same figures as scoring both models on those sequences."""
    from tuneship.evaluate.backends import generate_with_gguf
    from tuneship.export.faithfulness import measure_on_served_answers, scored_sequences

    served = generate_with_gguf(ggufs[quant], chat_format, prompts, MAX_NEW_TOKENS, keep_logits_bytes=1 << 30)
    result = measure_on_served_answers(ggufs["f16"], ggufs[quant], served, None)
    [scored] = measure_faithfulness(ggufs["f16"], {quant: ggufs[quant]}, scored_sequences(served)).values()
    assert result.positions == scored.positions == len(prompts) * MAX_NEW_TOKENS
    assert result.kl_divergence == pytest.approx(scored.kl_divergence, rel=2e-2)
    assert result.top1_agreement == pytest.approx(scored.top1_agreement, abs=1 / result.positions)
    if quant == "damaged":
        assert result.kl_divergence > load_config().export.max_kl_divergence
