"""Batches for training: padding-free packing (the default) or right padding, pads masked by position.

Packing puts a batch's examples end to end in one row with position ids that restart at 0 for each
example; with no attention mask, transformers turns the restarts into a block-diagonal causal mask, so
no example attends to another (tests/train/test_speed.py proves packed loss == padded loss).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneship.chat.format import IGNORE_INDEX, Rendered
from tuneship.chat.generation import shared_start

SHARED_PREFIX = "shared_prefix_tokens"  # the batch key, passed on to the attention function
EXAMPLE_INDICES = "example_indices"  # the batch key: which examples of the dataset it packs (not a model input)


@dataclass
class TokenCounter:
    """Counts what the trainer sees, for tokens/s: every non-pad token and the supervised ones."""

    tokens: int = 0
    supervised: int = 0


class ExampleDataset:
    def __init__(self, rendered: list[Rendered]):
        self.examples = [{"input_ids": r.input_ids, "labels": r.labels, "index": i} for i, r in enumerate(rendered)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def _count(counter: TokenCounter, features: list[dict]) -> None:
    for feature in features:
        counter.tokens += len(feature["input_ids"])
        counter.supervised += sum(1 for label in feature["labels"] if label != IGNORE_INDEX)


class PackCollator:
    """All examples of a batch in one row, no pad tokens, position ids restarting at each example. The examples'
    bounds go along as flash-attention's varlen arguments (`cu_seq_lens_q`...), which train/attention.py reads
    too. Each example's tokens after its last supervised prediction are left out (`predicting_end`), so the
    targets go along already shifted, as `shift_labels`: each position's next token in its own example.

    With `share_prefix` (only where train/attention.py's function attends, see there), the start every example
    of the batch shares (a system prompt, the template's header) is in the row once, as segment 0, and each
    example continues after it with positions counting on from it: `shared_prefix_tokens` says how long it is.
    """

    def __init__(self, counter: TokenCounter | None = None, share_prefix: bool = False):
        self.counter = counter or TokenCounter()
        self.share_prefix = share_prefix

    def __call__(self, features: list[dict]) -> dict:
        import torch

        shared = shared_prefix_length(features) if self.share_prefix else 0
        input_ids, targets, positions, bounds = [], [], [], [0]
        if shared:
            input_ids += features[0]["input_ids"][:shared]
            targets += [IGNORE_INDEX] * shared  # the prefix predicts no supervised token (shared_prefix_length)
            positions += range(shared)
            bounds.append(shared)
        for feature in features:
            end = predicting_end(feature["labels"])
            input_ids += feature["input_ids"][shared:end]
            targets += (feature["labels"] + [IGNORE_INDEX])[shared + 1 : end + 1]
            positions += range(shared, end)
            bounds.append(len(input_ids))
        _count(self.counter, features)
        cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)
        longest = int(cu_seq_lens.diff().max())
        next_tokens = torch.tensor([targets])
        batch = {
            "input_ids": torch.tensor([input_ids]),
            "labels": next_tokens,  # read by nobody: HF's loss takes shift_labels when given (it needs labels set)
            "shift_labels": next_tokens,
            "position_ids": torch.tensor([positions]),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        indices = {EXAMPLE_INDICES: [f["index"] for f in features]} if "index" in features[0] else {}
        return batch | ({SHARED_PREFIX: shared} if shared else {}) | indices


def shared_prefix_length(features: list[dict]) -> int:
    """How many leading tokens every example of the batch has in common and can compute once: never a token
    whose prediction is supervised (the prefix's last position predicts each example's next token, which differs
    between them, so that token must be unsupervised everywhere), and never a whole example. 0 for one example."""
    common = shared_start([feature["input_ids"] for feature in features])
    return max(min(common, *(_first_supervised(f["labels"]) - 1 for f in features)), 0)


def predicting_end(labels: list[int]) -> int:
    """How many leading tokens of an example (with `labels` aligned to its tokens) a packed row needs: up to the
    last one that predicts a supervised token. What follows (the stop token as an input, the template's newline
    after it) predicts nothing supervised and nothing attends to it; all tokens if none is supervised."""
    last = next((i for i in range(len(labels) - 1, 0, -1) if labels[i] != IGNORE_INDEX), None)
    return len(labels) if last is None else last


def _first_supervised(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


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
        _count(self.counter, features)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }
