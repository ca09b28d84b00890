"""The default gates stop broken answers: a model that answers empty, loops or leaks template text, and always
stops on the stop token (so the stop-rate gate alone let it through), fails `tuneship eval` with defaults."""

import json

import pytest
import yaml

from tests.conftest import tiny_config_file

GENERATION_PROMPT_END = 198  # "\n" after "<|im_start|>assistant" in SmolLM2's template
STOP = 2  # <|im_end|>
IM_START = 1
# " go Go GO\tgo  Go\n\nGO": six times the word "go", each a different token (a chain cannot revisit a token)
LOOP = [685, 2351, 21820, 197, 2345, 256, 6044, 1116, 21810]


def scripted_model(tiny_model_dir: str, folder, chain: list[int]) -> str:
    """The tiny model rewired to write `chain` greedily after the generation prompt, whatever the question.

    Each token of the chain gets an embedding dimension of its own, large enough to dominate the residual
    stream, and the (untied) output layer maps that dimension to the next token of the chain.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        for dim, (token, successor) in enumerate(zip(chain, chain[1:])):
            embed[token] = 0.0
            embed[token, dim] = 10.0
            head[successor, dim] = 10.0
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return str(folder)


def default_gates_config(tmp_path, model_dir: str, train_prompts: int):
    """A tiny run on the scripted model with every gate at its default; 1 step at the lowest learning rate
    leaves the model as scripted."""
    config = tiny_config_file(tmp_path, model_dir, max_steps=1, learning_rate=1e-6)
    data = yaml.safe_load(config.read_text())
    data["eval"] = {"train_prompts": train_prompts, "max_new_tokens": 16}
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.mark.parametrize(
    ("chain", "answer", "failures", "train_prompts"),
    [
        (
            [GENERATION_PROMPT_END, STOP],
            "",
            [
                "adapter: non-empty rate 0.00 < eval.min_non_empty_rate 1.0",
                "adapter: recall 0.00 < eval.min_recall 0.8",  # on by default for SFT with taught prompts
            ],
            3,
        ),
        (
            [GENERATION_PROMPT_END, *LOOP, STOP],
            "go Go GO\tgo  Go\n\nGO",
            ["adapter: loop rate 1.00 > eval.max_loop_rate 0.0"],
            0,
        ),
        (
            [GENERATION_PROMPT_END, IM_START, STOP],
            "<|im_start|>",
            ["adapter: leak rate 1.00 > eval.max_leak_rate 0.0"],
            0,
        ),
    ],
    ids=["empty", "loop", "leak"],
)
def test_broken_answers_that_stop_fail_eval_with_default_gates(
    tmp_path, tiny_model_dir, cli, chain, answer, failures, train_prompts
):
    model_dir = scripted_model(tiny_model_dir, tmp_path / "scripted", chain)
    config = default_gates_config(tmp_path, model_dir, train_prompts)
    assert cli("train", config).code == 0
    result = cli("eval", tmp_path / "runs" / "tiny")
    report = json.loads((tmp_path / "runs" / "tiny" / "reports" / "eval.json").read_text())
    adapter = report["models"]["adapter"]
    assert {a["answer"] for a in adapter["answers"]} == {answer} and adapter["summary"]["stop_rate"] == 1.0
    assert result.code == 4 and result.error.startswith("error: evaluation gates not met:")
    assert [line.strip() for line in result.error.splitlines()[1:]] == failures
