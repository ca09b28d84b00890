"""Greedy generation for eval and export: a batch whose finished answers leave it gives generate()'s answers."""

import pytest

from tuneship.chat.generation import greedy_continuations

QUESTIONS = ["Hi", "What is the tallest mountain on Earth, and how tall is it?", "2 + 2?", "Name three colours."]


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneship.chat.format import ChatFormat
    from tuneship.config import ChatSection

    # The tiny model with its own output layer (tied to the embeddings it repeats the last token) in float64: the
    # batch shrinking as answers stop changes the matmul shapes, and in float64 the rounding that follows cannot
    # move a random model's argmax, so the comparison with generate() is exact.
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    chat_format = ChatFormat.from_model_dir(tiny_model_dir, ChatSection())
    return model, chat_format, [chat_format.encode(chat_format.prompt_for(q)) for q in QUESTIONS]


def reference(model, encoded, stop_ids, pad_id, max_new_tokens):
    """transformers' generate, greedy, on the same left-padded batch, cut after the first stop token."""
    import torch

    width = max(len(ids) for ids in encoded)
    output = model.generate(
        input_ids=torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded]),
        attention_mask=torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
    )
    rows = [row[width:].tolist() for row in output]
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]


def test_answers_that_stop_leave_the_batch_and_the_rest_are_what_generate_gives(model_and_prompts):
    model, chat_format, encoded = model_and_prompts
    pad_id = chat_format.spec.pad_token_id
    free = greedy_continuations(model, encoded, set(), pad_id, 12)
    # stop tokens that end two answers early, at different steps, while the others go on to the limit
    stop_ids = {free[0][2], free[2][5]} - set(free[1]) - set(free[3])
    assert len(stop_ids) == 2
    ours = greedy_continuations(model, encoded, stop_ids, pad_id, 12)
    assert ours == reference(model, encoded, stop_ids, pad_id, 12)
    assert [len(answer) for answer in ours][1::2] == [12, 12] and all(len(a) < 12 for a in ours[0::2])
    assert free == reference(model, encoded, set(), pad_id, 12)
