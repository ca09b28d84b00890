"""Quant faithfulness on real llama.cpp logits: a tiny Llama exported to f16, Q8_0, Q4_K_M and a damaged copy."""

import shutil
from pathlib import Path

import pytest

from tuneship.config import load_config
from tuneship.errors import ConfigError
from tuneship.export.faithfulness import kl_gate_failures, measure_faithfulness
from tuneship.export.gguf import convert_to_gguf, quantize

MAX_NEW_TOKENS = 6


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
def prompt_tokens(tiny_model_dir) -> list[list[int]]:
    from tuneship.chat.format import ChatFormat
    from tuneship.config import ChatSection

    chat_format = ChatFormat.from_model_dir(tiny_model_dir, ChatSection())
    return [chat_format.encode(chat_format.prompt_for(f"Question number {i}?")) for i in range(4)]


def measure(ggufs, prompt_tokens, quants, **kwargs):
    return measure_faithfulness(
        ggufs["f16"], {name: ggufs[name] for name in quants}, prompt_tokens, [2], MAX_NEW_TOKENS, **kwargs
    )


def test_f16_against_itself_has_zero_kl_and_full_top1_agreement(ggufs, prompt_tokens):
    [itself] = measure(ggufs, prompt_tokens, ["f16"]).values()
    assert itself.kl_divergence == 0.0
    assert itself.top1_agreement == 1.0
    assert len(prompt_tokens) <= itself.positions <= len(prompt_tokens) * MAX_NEW_TOKENS


def test_quants_diverge_from_f16_and_fewer_bits_diverge_more(ggufs, prompt_tokens):
    measured = measure(ggufs, prompt_tokens, ["Q8_0", "Q4_K_M"])
    assert 0.0 < measured["Q8_0"].kl_divergence < measured["Q4_K_M"].kl_divergence
    assert measured["Q8_0"].positions == measured["Q4_K_M"].positions
    assert 0.5 <= measured["Q4_K_M"].top1_agreement <= measured["Q8_0"].top1_agreement <= 1.0


def test_chunked_reference_rows_give_the_same_figures_as_one_chunk(ggufs, prompt_tokens):
    one_chunk = measure(ggufs, prompt_tokens, ["Q4_K_M"])
    one_sequence_per_chunk = measure(ggufs, prompt_tokens, ["Q4_K_M"], memory_budget_bytes=1)
    assert one_sequence_per_chunk == one_chunk


def test_damaged_model_fails_the_default_kl_gate_and_a_good_quant_passes(ggufs, prompt_tokens):
    limit = load_config().export.max_kl_divergence
    measured = measure(ggufs, prompt_tokens, ["Q8_0", "damaged"])
    assert measured["damaged"].kl_divergence > limit > measured["Q8_0"].kl_divergence
    [failure] = kl_gate_failures(measured, limit)
    assert failure.startswith(f"gguf-damaged: KL vs f16 {measured['damaged'].kl_divergence:.4f} > ")
    assert f"export.max_kl_divergence {limit}" in failure
    assert kl_gate_failures(measured, None) == []


def test_non_finite_kl_fails_the_gate(ggufs, prompt_tokens):
    [measured] = measure(ggufs, prompt_tokens, ["Q8_0"]).values()
    measured.kl_divergence = float("nan")
    assert kl_gate_failures({"Q8_0": measured}, 1.0)


@pytest.mark.parametrize("value", ["0", "-0.1", "11"])
def test_max_kl_divergence_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="export.max_kl_divergence"):
        load_config(overrides=[f"export.max_kl_divergence={value}"])
