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
    pad_id = chat_format.spec.pad_token_id
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), GENERATION_BATCH):
            encoded = [chat_format.encode(p) for p in prompts[start : start + GENERATION_BATCH]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded])
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
            answers += [_answer(row[width:].tolist(), stop_ids, chat_format) for row in output]
    finally:
        model.train(was_training)
    return answers


def _answer(new_ids: list[int], stop_ids: list[int], chat_format) -> Answer:
    end = next((i for i, token in enumerate(new_ids) if token in stop_ids), None)
    kept = new_ids if end is None else new_ids[:end]
    text = chat_format.tokenizer.decode(kept, skip_special_tokens=False)
    return Answer(text.strip(), end is not None, len(kept) + (end is not None))
