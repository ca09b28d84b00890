"""The training loss: logits and cross-entropy only where a supervised label follows, in chunks.

Most tokens of a chat example are prompt (system prompt, question), and a small model's vocabulary
projection is a large share of its compute (SmolLM2-135M: 49,152 x 576, a fifth of the model). The
model's own loss projects every position onto the vocabulary and upcasts all those logits to fp32;
here only the positions that predict a supervised token are projected, through the model's own forward
(`logits_to_keep`, so DDP and PEFT wrappers see an ordinary call), and the fp32 cross-entropy runs a
chunk of positions at a time.
"""

from __future__ import annotations

from tuneship.chat.format import IGNORE_INDEX

LOSS_CHUNK_TOKENS = 2048


TARGET_KEYS = ("labels", "shift_labels")  # batch keys that are not model inputs here


def next_token_targets(batch: dict):
    """(positions, targets): the positions (1-D) whose next token is supervised in some row of the batch, and
    those next tokens (batch, positions). A packed batch gives them shifted (`shift_labels`, train/batches.py), a
    padded one as `labels` aligned to its tokens. A padded batch keeps the union over its rows: the ignored
    labels there add nothing to the loss."""
    following = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]
    positions = (following != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    return positions, following[:, positions]


def model_inputs(batch: dict) -> dict:
    return {name: value for name, value in batch.items() if name not in TARGET_KEYS}


def supervised_loss_sum(model, batch: dict):
    """(summed cross-entropy over supervised tokens, their count), computing logits only where needed."""
    import torch
    import torch.nn.functional as F

    positions, targets = next_token_targets(batch)
    logits = model(**model_inputs(batch), logits_to_keep=positions, use_cache=False).logits  # (batch, positions, vocab)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, positions.numel(), LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        total = total + F.cross_entropy(
            logits[:, chunk].flatten(0, 1).float(), targets[:, chunk].flatten(), reduction="sum"
        )
    return total, int((targets != IGNORE_INDEX).sum())
