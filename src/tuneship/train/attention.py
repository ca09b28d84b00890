"""Attention for packed batches at the cost of each example's own length.

A packed row holds a batch's examples end to end. With SDPA, transformers builds a block-diagonal mask
over the whole row, and attention costs (row length)^2 per head: 8 examples of 70 tokens pay for 560^2,
eight times the 8 x 70^2 they need, and an explicit mask also keeps SDPA off its causal fast path. On a
CPU that was a quarter of a SmolLM2-135M training step. Here the row is cut at the example boundaries
(`cu_seq_lens_q`, which the pack collator passes as flash-attention's varlen kernels expect), the examples
become a batch of causal sequences padded at their ends. Padding at the end of a causal sequence is never
attended to by a real token, so no mask is needed, and the pad slots are dropped on the way back. Short
examples (most chat examples) take an explicit softmax(q k^T) v: on a CPU, SDPA's flash kernel is slow in
its bf16 backward at small sizes (12 ms against 4 ms for 8 examples of 75 tokens, 9 heads). Longer ones take
SDPA with `is_causal`. Without `cu_seq_lens_q` (padded batches, generation) this is plain SDPA.
Measured on SmolLM2-135M, batch 8, 2-core CPU, bf16: 289 -> 363 trained tokens/s in forward + backward.
"""

from __future__ import annotations

PACKED_SDPA = "tuneship_packed_sdpa"
NOT_CAUSAL_ONLY = ("softcap", "s_aux", "sinks", "position_bias")  # attention arguments this path does not apply
EXPLICIT_ATTENTION_MAX_TOKENS = 192  # longer examples: SDPA's kernel (measured crossover ~200-250 on a CPU)


def use_packed_attention(model) -> None:
    """Make `model` (and its PEFT wrapper's base) attend per example in packed batches."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # padded batches keep SDPA's own masks
    model.config._attn_implementation = PACKED_SDPA


def segment_slots(cu_seq_lens):
    """(index, is_real): for each example (row) and slot (column) up to the longest example, the position in
    the packed row it reads, and whether it is a real token. Slots past an example's end repeat its last
    token: in a causal sequence nothing real attends to them."""
    import torch

    starts, lengths = cu_seq_lens[:-1], cu_seq_lens.diff()
    slots = torch.arange(int(lengths.max()), device=cu_seq_lens.device)
    is_real = slots[None, :] < lengths[:, None]
    index = starts[:, None] + torch.minimum(slots[None, :], lengths[:, None] - 1)
    return index, is_real


def packed_sdpa_forward(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """The `AttentionInterface` function: per-example causal attention for one packed row, SDPA otherwise
    (and where a model's attention is more than a causal mask: a sliding window shorter than an example, logit
    soft-capping, attention sinks, a position bias)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if (
        cu_seq_lens_q is None
        or query.shape[0] != 1
        or cu_seq_lens_q.numel() < 3
        or (window is not None and window < int(cu_seq_lens_q.diff().max()))
        or any(kwargs.get(name) is not None for name in NOT_CAUSAL_ONLY)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    index, is_real = segment_slots(cu_seq_lens_q.to(query.device))
    examples, slots = index.shape

    def by_example(states):  # (1, heads, row, dim) -> (examples, heads, slots, dim)
        gathered = states[0].index_select(1, index.flatten())
        return gathered.unflatten(1, (examples, slots)).transpose(0, 1)

    query, key, value = by_example(query), by_example(key), by_example(value)
    if slots <= EXPLICIT_ATTENTION_MAX_TOKENS:
        output = causal_attention(query, key, value, kwargs.get("scaling"), kwargs.get("dropout", 0.0))
    else:
        kwargs.pop("is_causal", None)
        output, _ = sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    return output[is_real].unsqueeze(0), None  # (1, row, heads, dim), as SDPA returns it


def causal_attention(query, key, value, scaling: float | None, dropout: float):
    """softmax(q k^T) v under a causal mask, softmax in fp32 (as transformers' eager attention), returned as
    (batch, tokens, heads, dim). For short sequences on a CPU this is several times faster than SDPA's
    flash kernel, whose backward is slow at small sizes in bf16."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    tokens = query.shape[2]
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32)
    weights = torch.nn.functional.dropout(weights.to(value.dtype), p=dropout, training=dropout > 0)
    return torch.matmul(weights, value).transpose(1, 2)
