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

A shared prefix (train.shared_prefix): when every example of a batch starts with the same tokens (the
system prompt, the template's header), the pack collator puts them in the row once, and each example's
queries see those keys before their own. Every layer's states of those tokens are the same in every example
(causal attention: they depend on nothing after them), so this is the padded batch's loss and gradients (the
prefix's gradient is the sum over the examples, by autograd), at the cost of computing the prefix once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tuneship.train.batches import SHARED_PREFIX

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
    soft-capping, attention sinks, a position bias). A row with a shared prefix (`shared_prefix_tokens`, see
    train/batches.py) gets that prefix's keys in front of each example's own."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = kwargs.pop(SHARED_PREFIX, 0)
    if cu_seq_lens_q is None or query.shape[0] != 1 or cu_seq_lens_q.numel() < 3:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.to(query.device)
    window = kwargs.get("sliding_window")
    if (window is not None and window < shared + int(bounds.diff().max())) or any(
        kwargs.get(name) is not None for name in NOT_CAUSAL_ONLY
    ):
        if shared:  # transformers' mask would hide the prefix from all but the first example
            attention_mask = shared_prefix_row_mask(bounds, shared, window)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if not shared:
        return _per_example(module, query, key, value, bounds, 0, kwargs).unsqueeze(0), None
    prefix = slice(0, shared)
    prefix_output = _attend(module, query[:, :, prefix], key[:, :, prefix], value[:, :, prefix], 0, kwargs)
    examples_output = _per_example(module, query, key, value, bounds, shared, kwargs)
    return torch.cat([prefix_output[0], examples_output]).unsqueeze(0), None


def _per_example(module, query, key, value, bounds, shared: int, kwargs):
    """(real tokens, heads, dim): each example's queries against the shared prefix's keys and its own (`bounds`:
    the row's, the shared prefix's segment first when there is one). Queries, keys and values are gathered
    straight into the batched layout the products read (one `index_select` each, no copy after it), and the
    output is gathered back into the row's token order the same way."""
    heads, row, dim = query.shape[1:]
    key_heads = key.shape[1]
    layout = example_layout(bounds, shared, heads, key_heads, row)
    examples, slots, keys = layout.examples, layout.slots, layout.keys
    queries = _rows(query).index_select(0, layout.query_rows)  # (example, key head, group member, slot)
    example_keys = _rows(key).index_select(0, layout.key_rows).view(examples * key_heads, keys, dim)
    example_values = _rows(value).index_select(0, layout.key_rows).view(examples * key_heads, keys, dim)
    if keys <= EXPLICIT_ATTENTION_MAX_TOKENS:
        grouped = queries.view(examples * key_heads, heads // key_heads * slots, dim)
        scale = kwargs["scaling"] if kwargs.get("scaling") is not None else dim**-0.5
        output = grouped_causal_attention(
            grouped, example_keys, example_values, slots, scale, kwargs.get("dropout", 0.0)
        )
    else:
        output = _attend(
            module,
            queries.view(examples, heads, slots, dim),
            example_keys.view(examples, key_heads, keys, dim),
            example_values.view(examples, key_heads, keys, dim),
            shared,
            kwargs,
        ).transpose(1, 2)  # (examples, heads, slots, dim) as the rows below count
    return output.reshape(-1, dim).index_select(0, layout.output_rows).view(-1, heads, dim)


def _rows(states):
    """(1, heads, row, dim) -> (heads x row, dim): a head's positions one after another."""
    return states[0].reshape(-1, states.shape[-1])


@dataclass(frozen=True)
class ExampleLayout:
    """Where each example's queries, keys and outputs are in a packed row's (heads x row, dim) states."""

    examples: int
    slots: int  # the longest example's tokens (each example padded at its end to it)
    keys: int  # shared prefix + slots
    query_rows: object  # (examples, key heads, group, slots): query head (key head x group + member)'s row
    key_rows: object  # (examples, key heads, keys): the prefix's keys, then the example's own
    output_rows: object  # (real tokens, heads): each token's row in the (examples, heads, slots) output


_last_layout: list = [None, None]  # (bounds tensor, its layout): every layer of a forward pass reads the same


def example_layout(bounds, shared: int, heads: int, key_heads: int, row: int) -> ExampleLayout:
    """The layout of one packed row's examples (`bounds`: the row's, the shared prefix's segment first when there
    is one), worked out once per forward pass: every layer is given the same `bounds` tensor."""
    import torch

    cached_bounds, layout = _last_layout
    key = (shared, heads, key_heads, row)
    if cached_bounds is bounds and layout[0] == key:
        return layout[1]
    index, is_real = segment_slots(bounds[1:] if shared else bounds)
    examples, slots = index.shape
    key_index = index
    if shared:
        prefix = torch.arange(shared, device=index.device).expand(examples, shared)
        key_index = torch.cat([prefix, index], dim=1)
    head = torch.arange(heads, device=index.device)
    key_head = torch.arange(key_heads, device=index.device)
    example, slot = is_real.nonzero(as_tuple=True)  # the row's tokens in order (examples lie end to end)
    computed = ExampleLayout(
        examples=examples,
        slots=slots,
        keys=key_index.shape[1],
        query_rows=(head[None, :, None] * row + index[:, None, :]).flatten(),
        key_rows=(key_head[None, :, None] * row + key_index[:, None, :]).flatten(),
        output_rows=((example[:, None] * heads + head) * slots + slot[:, None]).flatten(),
    )
    _last_layout[:] = [bounds, (key, computed)]
    return computed


def _attend(module, query, key, value, shared: int, kwargs):
    """(batch, tokens, heads, dim): causal attention, each query also seeing `shared` leading keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.shape[2] <= EXPLICIT_ATTENTION_MAX_TOKENS:
        return causal_attention(query, key, value, kwargs.get("scaling"), kwargs.get("dropout", 0.0))
    options = {name: value for name, value in kwargs.items() if name != "is_causal"}
    if not shared:
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **options)[0]
    mask = _future(query.shape[2], shared, query.device).logical_not()  # SDPA's is_causal aligns top-left
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **options)[0]


def shared_prefix_row_mask(bounds, shared: int, window: int | None):
    """(1, 1, row, row) boolean mask of a row with a shared prefix, for transformers' SDPA function: a token
    sees the earlier tokens of its own example and of the prefix (within `window` positions, if any)."""
    import torch

    lengths = bounds.diff()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=bounds.device), lengths)
    starts = torch.repeat_interleave(bounds[:-1], lengths)
    offsets = torch.repeat_interleave(torch.where(torch.arange(len(lengths)) > 0, shared, 0).to(bounds.device), lengths)
    position = torch.arange(int(bounds[-1]), device=bounds.device) - starts + offsets
    same = (segment[:, None] == segment[None, :]) | (segment[None, :] == 0)
    allowed = same & (position[None, :] <= position[:, None])
    if window is not None:
        allowed &= position[:, None] - position[None, :] < window
    return allowed[None, None]


def causal_attention(query, key, value, scaling: float | None, dropout: float):
    """softmax(q k^T) v under a causal mask, softmax in fp32 (as transformers' eager attention), for (batch,
    heads, tokens, dim) states, returned as (batch, tokens, heads, dim). Keys beyond the queries' count lead (a
    shared prefix every query sees). For short sequences on a CPU this is several times faster than SDPA's flash
    kernel, whose backward is slow at small sizes in bf16."""
    batch, heads, tokens, dim = query.shape
    key_heads = key.shape[1]
    output = grouped_causal_attention(
        query.reshape(batch * key_heads, heads // key_heads * tokens, dim),
        key.reshape(batch * key_heads, -1, dim),
        value.reshape(batch * key_heads, -1, dim),
        tokens,
        scaling if scaling is not None else dim**-0.5,
        dropout,
    )
    return output.view(batch, heads, tokens, dim).transpose(1, 2)


def grouped_causal_attention(grouped, keys, values, tokens: int, scale: float, dropout: float):
    """causal_attention on (batch x key heads, group x tokens, dim) queries: grouped-query attention without
    copying keys and values for each query head, the queries of a key head's group one matrix (heads sharing a
    key head, then tokens), a quarter less time for SmolLM2's 3 query heads per key head than repeating the
    keys. The scale and the mask are one `baddbmm` onto a kept additive mask: no scaling, mask or masking pass,
    forward or backward (1444 -> 1390 ms a SmolLM2-135M step, 2-core AVX2 CPU, fp32). Returns (batch x key
    heads, group x tokens, dim)."""
    import torch

    group = grouped.shape[1] // tokens
    mask = causal_bias(tokens, keys.shape[1] - tokens, group, grouped.dtype, grouped.device)
    scores = torch.baddbmm(mask, grouped, keys.transpose(1, 2), alpha=scale)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    weights = torch.nn.functional.dropout(weights.to(values.dtype), p=dropout, training=dropout > 0)
    return torch.bmm(weights, values)


@lru_cache(maxsize=256)
def causal_bias(tokens: int, shared: int, group: int, dtype, device):
    """(group x tokens, shared + tokens): 0 where a query (of each of a key head's `group` query heads) may see a
    key, -inf where not (`_future`). Never written to: every call with these sizes shares it."""
    import torch

    future = _future(tokens, shared, device)
    return torch.zeros(future.shape, dtype=dtype, device=device).masked_fill_(future, float("-inf")).repeat(group, 1)


def _future(tokens: int, shared: int, device):
    """(tokens, shared + tokens) True where query i must not see key j: j is past i, counting after the prefix."""
    import torch

    return torch.ones(tokens, shared + tokens, dtype=torch.bool, device=device).triu(shared + 1)
