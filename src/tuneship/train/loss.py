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


def predicting_positions(labels):
    """Positions (1-D) whose next label is supervised in some row of the batch: the logits the loss needs.

    A packed batch is one row, so these are exactly its supervised predictions; a padded batch keeps the
    union over its rows, and the ignored labels there add nothing to the loss.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def supervised_loss_sum(model, batch: dict):
    """(summed cross-entropy over supervised tokens, their count), computing logits only where needed."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    positions = predicting_positions(labels)
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits  # (batch, positions, vocab)
    targets = labels[:, positions + 1]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, positions.numel(), LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        total = total + F.cross_entropy(
            logits[:, chunk].flatten(0, 1).float(), targets[:, chunk].flatten(), reduction="sum"
        )
    return total, int((targets != IGNORE_INDEX).sum())
