"""Greedy generation through the run's ChatFormat, reporting whether each answer stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GENERATION_BATCH = 32


@dataclass
class Answer:
    text: str
    stopped: bool
    new_tokens: int

    def to_json(self) -> dict:
        return asdict(self)


def generate_answers(model, chat_format, prompts: list[str], max_new_tokens: int = 128) -> list[Answer]:
    """Greedy answers to rendered prompts; `stopped` is True only when a stop token ended the answer."""
    import torch

    stop_ids = chat_format.spec.stop_token_ids
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), GENERATION_BATCH):
                encoded = [chat_format.encode(p) for p in prompts[start : start + GENERATION_BATCH]]
                continuations = greedy_continuations(
                    model, encoded, set(stop_ids), chat_format.spec.pad_token_id, max_new_tokens
                )
                answers += [_answer(ids, stop_ids, chat_format) for ids in continuations]
    finally:
        model.train(was_training)
    return answers


def greedy_continuations(model, encoded: list[list[int]], stop_ids: set[int], pad_id: int, max_new_tokens: int):
    """Each prompt's greedy continuation, through its stop token, decoded as one batch with a KV cache.

    Two things transformers' generate does not do: the start all prompts share (system prompt, template header)
    is computed once and its cache copied to every row (the prompts then follow, left-padded, after it), and an
    answer that stops leaves the batch (its rows of the cache are dropped). generate computes every prompt's
    shared start again, and every row until the longest answer ends: a base model's few answers that never stop
    would make the whole batch run to max_new_tokens."""
    import torch
    from transformers import DynamicCache

    device = model.device
    cache = DynamicCache(config=model.config)
    shared = shared_start(encoded)
    if shared:
        model(input_ids=torch.tensor([encoded[0][:shared]], device=device), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(encoded))
    own = [ids[shared:] for ids in encoded]
    width = max(len(ids) for ids in own)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in own], device=device)
    attention = torch.tensor([[1] * shared + [0] * (width - len(ids)) + [1] * len(ids) for ids in own], device=device)
    live = list(range(len(encoded)))  # the prompts whose answers go on, in the order of the batch rows
    continuations: list[list[int]] = [[] for _ in encoded]
    for _ in range(max_new_tokens):
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        logits = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        tokens = logits.argmax(-1).tolist()
        going = [row for row, token in enumerate(tokens) if token not in stop_ids]
        for prompt, token in zip(live, tokens):
            continuations[prompt].append(token)
        if not going:
            break
        if len(going) < len(live):
            kept = torch.tensor(going, device=device)
            cache.batch_select_indices(kept)
            attention = attention[kept]
            live = [live[row] for row in going]
        input_ids = torch.tensor([[tokens[row]] for row in going], device=device)
        attention = torch.cat([attention, attention.new_ones((len(going), 1))], dim=1)
    return continuations


def shared_start(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence has in common, leaving each at least its last token (the one whose
    logits a prompt reads); 0 for fewer than two sequences. What batched generation (here and in llama.cpp) and
    packed training compute once."""
    if len(sequences) < 2:
        return 0
    first, limit = sequences[0], max(min(len(ids) for ids in sequences) - 1, 0)
    return next((i for i in range(limit) if any(ids[i] != first[i] for ids in sequences[1:])), limit)


def _answer(new_ids: list[int], stop_ids: list[int], chat_format) -> Answer:
    end = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    kept = new_ids if end is None else new_ids[:end]
    text = chat_format.tokenizer.decode(kept, skip_special_tokens=False)
    return Answer(text.strip(), end is not None, len(kept) + (end is not None))
