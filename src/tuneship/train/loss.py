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
    """Boolean (batch, seq): True where the next label is supervised, i.e. the logits the loss needs."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def supervised_loss_sum(model, batch: dict):
    """(summed cross-entropy over supervised tokens, their count), computing logits only where needed."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    keep = predicting_positions(labels)
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (supervised tokens, vocab)
    targets = labels[:, 1:][keep[:, :-1]]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        total = total + F.cross_entropy(logits[chunk].float(), targets[chunk], reduction="sum")
    return total, targets.numel()
