"""Batches for training: right padding, pads masked by position (never by token id)."""

from __future__ import annotations

from dataclasses import dataclass

from tuneship.chat.format import IGNORE_INDEX, Rendered


@dataclass
class TokenCounter:
    """Counts what the trainer sees, for tokens/s: every non-pad token and the supervised ones."""

    tokens: int = 0
    supervised: int = 0


class ExampleDataset:
    def __init__(self, rendered: list[Rendered]):
        self.examples = [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class PadCollator:
    def __init__(self, pad_token_id: int, counter: TokenCounter | None = None):
        self.pad_token_id = pad_token_id
        self.counter = counter or TokenCounter()

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention = [], [], []
        for feature in features:
            real = len(feature["input_ids"])
            padding = width - real
            input_ids.append(feature["input_ids"] + [self.pad_token_id] * padding)
            labels.append(feature["labels"] + [IGNORE_INDEX] * padding)
            attention.append([1] * real + [0] * padding)
            self.counter.tokens += real
            self.counter.supervised += sum(1 for label in feature["labels"] if label != IGNORE_INDEX)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }
