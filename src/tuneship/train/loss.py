"""The training loss: logits and cross-entropy only where a supervised label follows, in chunks.

Most tokens of a chat example are prompt (system prompt, question), and a small model's vocabulary
projection is a large share of its compute (SmolLM2-135M: 49,152 x 576, a fifth of the model). The
model's own loss projects every position onto the vocabulary and upcasts all those logits to fp32;
here only the positions that predict a supervised token are projected, through the model's own forward
(`logits_to_keep`, so DDP and PEFT wrappers see an ordinary call), and the fp32 cross-entropy runs a
chunk of positions at a time. The last decoder layer's MLP runs at those positions only (`kept_logits`).
"""

from __future__ import annotations

from contextlib import contextmanager

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


def kept_logits(model, inputs: dict, positions):
    """(batch, positions, vocab): the model's logits at `positions` only."""
    with last_mlp_at(model, positions):
        return model(**inputs, logits_to_keep=positions, use_cache=False).logits


@contextmanager
def last_mlp_at(model, positions):
    """The last decoder layer's MLP run at `positions` only, zeros elsewhere. Only those positions reach the
    vocabulary projection, and nothing after an MLP mixes positions, so the logits there and every gradient are
    the same; the other positions' states are computed and dropped. The MLP is three quarters of a Llama layer's
    weights, and about half the positions of a chat batch predict a supervised token. Not for mixtures of experts
    (their routing losses see every token), nor a model without `layers[-1].mlp`."""
    mlp = last_mlp(model)
    if mlp is None:
        yield
        return
    own_forward = mlp.forward

    def forward(hidden_states):
        kept = own_forward(hidden_states.index_select(1, positions))
        return hidden_states.new_zeros(hidden_states.shape).index_copy_(1, positions, kept)

    mlp.forward = forward
    try:
        yield
    finally:
        del mlp.forward


MIXTURE_OF_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")  # config fields


def last_mlp(model):
    """The MLP module of `model`'s last decoder layer (through DDP and PEFT wrappers), or None."""
    import torch

    model = getattr(model, "module", model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = model.config.get_text_config()
    if any(getattr(config, name, None) for name in MIXTURE_OF_EXPERTS) or not hasattr(model, "get_decoder"):
        return None
    layers = getattr(model.get_decoder(), "layers", None)
    mlp = getattr(layers[-1], "mlp", None) if layers else None
    return mlp if isinstance(mlp, torch.nn.Module) and "forward" not in vars(mlp) else None


def supervised_loss_sum(model, batch: dict):
    """(summed cross-entropy over supervised tokens, their count), computing logits only where needed."""
    import torch
    import torch.nn.functional as F

    positions, targets = next_token_targets(batch)
    logits = kept_logits(model, model_inputs(batch), positions)  # (batch, positions, vocab)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, positions.numel(), LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        total = total + F.cross_entropy(
            logits[:, chunk].flatten(0, 1).float(), targets[:, chunk].flatten(), reduction="sum"
        )
    return total, int((targets != IGNORE_INDEX).sum())
