"""Greedy answers to a whole prompt set at once in llama.cpp: every prompt one sequence of one context.

One prompt after another, llama.cpp decodes one token per step, and on a small model each step costs the
thread synchronisations of a whole forward pass whatever its size (SmolLM2-135M on a 2-core CPU: 8-12 ms a
token). Here each step decodes the next token of every unfinished answer together, and the start the prompts
share (system prompt, template header) is computed once: its tokens belong to every sequence of a unified
KV cache. The answers are greedy (the highest logit, the lowest token id among equals, as llama.cpp's greedy
sampler) and stop at a stop token or the model's end-of-generation token.

llama-cpp-python's `Llama` builds contexts for one sequence only, so this uses its low-level API (the ctypes
bindings of llama.h) on the model a `Llama` has loaded: a context with `n_seq_max` sequences, and batches
whose tokens carry their sequence ids. The KV cache is kept under KV_BUDGET_BYTES: a prompt set larger than
that is answered in waves of prompts.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tuneship.chat.generation import shared_start

KV_BUDGET_BYTES = 1 << 30
MAX_SEQUENCES = 64  # per wave; llama.cpp's own limit (LLAMA_MAX_SEQ) is higher
MAX_UBATCH = 512


@dataclass
class Continuation:
    """A prompt's tokens, the answer's tokens, and the token that ended it (None: cut at max_new_tokens); with
    `keep_logits`, the float32 logits each answer token (and the end token) was chosen from, one row each."""

    prompt: list[int]
    answer: list[int]
    end: int | None
    logits: list | None = None


def greedy_continuations(
    llm,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    lora_path: Path | None = None,
    keep_logits_bytes: int = 0,
) -> list[Continuation]:
    """Every prompt (token ids) continued greedily by the model `llm` (a llama_cpp.Llama) has loaded, in order;
    `keep_logits_bytes`: with the logits of every answer position (for the KL of another model on these
    answers) while they fit in that many bytes, else none of them (Continuation.logits None)."""
    import llama_cpp

    ends = stop_ids | {llama_cpp.llama_vocab_eos(llama_cpp.llama_model_get_vocab(llm.model))}
    adapter = _load_adapter(llm, lora_path) if lora_path else None
    continuations: list[Continuation] = []
    budget = [keep_logits_bytes]  # bytes of logits that may still be kept
    for wave in _waves(prompts, max_new_tokens, _kv_bytes_per_token(llm)):
        continuations += _answer_wave(llm, wave, max_new_tokens, ends, adapter, budget)
    if budget[0] < 0:  # over the budget: none kept (the first rows of some would mislead)
        for continuation in continuations:
            continuation.logits = None
    return continuations


def _answer_wave(llm, prompts, max_new_tokens: int, ends: set[int], adapter, budget: list[int]) -> list[Continuation]:
    import llama_cpp
    import numpy as np

    shared = shared_start(prompts)
    own = [len(prompt) - shared for prompt in prompts]
    continuations = [Continuation(prompt, [], None, [] if budget[0] > 0 else None) for prompt in prompts]
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    size = shared + sum(own) + len(prompts) * max_new_tokens
    with _context(llm, size, len(prompts), max(shared + sum(own), len(prompts)), adapter) as (context, batch):
        _add_shared_start(batch, prompts[0][:shared], len(prompts))
        reading = {}  # sequence -> the batch index of the logits that give its next token
        for sequence, prompt in enumerate(prompts):
            for position in range(shared, len(prompt)):
                _add(batch, prompt[position], position, [sequence], position == len(prompt) - 1)
            reading[sequence] = batch.n_tokens - 1
        while reading:
            _decode(context, batch)
            batch.n_tokens = 0
            following = {}
            for sequence, index in reading.items():
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, index), shape=(n_vocab,))
                token = int(logits.argmax())
                continuation = continuations[sequence]
                if continuation.logits is not None and budget[0] >= 0:
                    continuation.logits.append(logits.copy())
                    budget[0] -= logits.nbytes
                if token in ends:
                    continuation.end = token
                    continue
                continuation.answer.append(token)
                if len(continuation.answer) < max_new_tokens:
                    _add(batch, token, len(continuation.prompt) + len(continuation.answer) - 1, [sequence], True)
                    following[sequence] = batch.n_tokens - 1
            reading = following
    return continuations


def position_logits(llm, sequences: list[tuple[list[int], int]], lora_path: Path | None = None) -> list:
    """For each (tokens, first): float32 logits (rows, vocab) of positions first .. len(tokens) - 2 (the rows that
    predict tokens first + 1 .. the last), every sequence of a wave in one batch, their shared start once; with
    `lora_path`, the LoRA GGUF applied on the model."""
    adapter = _load_adapter(llm, lora_path) if lora_path else None
    rows: list = []
    for wave in _waves([tokens for tokens, _ in sequences], 0, _kv_bytes_per_token(llm)):
        rows += _wave_logits(llm, sequences[len(rows) : len(rows) + len(wave)], adapter)
    return rows


def _wave_logits(llm, sequences: list[tuple[list[int], int]], adapter) -> list:
    import llama_cpp
    import numpy as np

    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    shared = min(shared_start([tokens for tokens, _ in sequences]), *(first for _, first in sequences))
    size = sum(len(tokens) - shared for tokens, _ in sequences) + shared
    with _context(llm, size, len(sequences), size, adapter) as (context, batch):
        _add_shared_start(batch, sequences[0][0][:shared], len(sequences))  # no position to read is in it
        reads = []
        for sequence, (tokens, first) in enumerate(sequences):
            index_of_position = batch.n_tokens - shared
            for position in range(shared, len(tokens)):
                _add(batch, tokens[position], position, [sequence], first <= position < len(tokens) - 1)
            reads.append(range(index_of_position + first, index_of_position + len(tokens) - 1))
        _decode(context, batch)
        return [
            np.array(
                [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, i), shape=(n_vocab,)) for i in read]
            ).reshape(len(read), n_vocab)
            for read in reads
        ]


@contextmanager
def _context(llm, n_ctx: int, sequences: int, largest_batch: int, adapter) -> Iterator[tuple]:
    """A context for `sequences` sequences in one unified KV cache of `n_ctx` cells, and a batch for it."""
    import llama_cpp

    from tuneship.train.precision import compute_threads

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = largest_batch
    params.n_ubatch = min(largest_batch, MAX_UBATCH)
    params.n_seq_max = sequences
    params.kv_unified = True  # a token of the shared start belongs to every sequence
    params.n_threads = params.n_threads_batch = compute_threads()
    params.no_perf = True
    context = llama_cpp.llama_init_from_model(llm.model, params)
    if context is None:
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {sequences} sequences")
    batch = llama_cpp.llama_batch_init(largest_batch, 0, sequences)
    try:
        if adapter is not None:
            set_lora(context, adapter)
        yield context, batch
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(context)


def _add(batch, token: int, position: int, sequences: list[int], wants_logits: bool) -> None:
    index = batch.n_tokens
    batch.token[index] = token
    batch.pos[index] = position
    batch.n_seq_id[index] = len(sequences)
    for slot, sequence in enumerate(sequences):
        batch.seq_id[index][slot] = sequence
    batch.logits[index] = wants_logits
    batch.n_tokens = index + 1


def _add_shared_start(batch, tokens: list[int], sequences: int) -> None:
    """The start every sequence shares, once: each token belongs to all sequences (no logits)."""
    everyone = list(range(sequences))
    for position, token in enumerate(tokens):
        _add(batch, token, position, everyone, False)


def _decode(context, batch) -> None:
    import llama_cpp

    status = llama_cpp.llama_decode(context, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode failed with status {status} on a batch of {batch.n_tokens} tokens")


def _load_adapter(llm, lora_path: Path):
    """A LoRA GGUF loaded for `llm`'s model (llama.cpp frees it with the model)."""
    return load_lora(llm.model, lora_path)


def load_lora(model, lora_path: Path):
    """A LoRA GGUF loaded for a llama.cpp model (a llama_model pointer), not yet applied to any context."""
    import llama_cpp

    adapter = llama_cpp.llama_adapter_lora_init(model, str(lora_path).encode("utf-8"))
    if adapter is None:
        raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora_path.name}")
    return adapter


def set_lora(context, adapter) -> None:
    """The context computes with `adapter` (a loaded LoRA, at scale 1) from now on; None: with no adapter."""
    import llama_cpp

    if adapter is None:
        status = llama_cpp.llama_set_adapters_lora(context, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        status = llama_cpp.llama_set_adapters_lora(context, adapters, 1, (ctypes.c_float * 1)(1.0))
    if status != 0:
        raise RuntimeError("llama.cpp could not set the LoRA adapter of the context")


def _kv_bytes_per_token(llm) -> int:
    """f16 keys and values of every layer for one token."""
    import llama_cpp

    model = llm.model
    head_dim = llama_cpp.llama_model_n_embd(model) // max(llama_cpp.llama_model_n_head(model), 1)
    return 2 * 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim


def _waves(prompts: list[list[int]], max_new_tokens: int, bytes_per_token: int) -> Iterator[list[list[int]]]:
    """Consecutive prompts whose KV cache fits KV_BUDGET_BYTES, at most MAX_SEQUENCES of them."""
    return consecutive_groups(
        prompts, lambda prompt: (len(prompt) + max_new_tokens) * bytes_per_token, KV_BUDGET_BYTES, MAX_SEQUENCES
    )


def consecutive_groups(items: list, size, budget: int, most: int | None = None) -> Iterator[list]:
    """Consecutive items whose `size(item)` sum stays within `budget` (an item alone may exceed it), at most
    `most` items a group."""
    group: list = []
    used = 0
    for item in items:
        cost = size(item)
        if group and (used + cost > budget or len(group) == most):
            yield group
            group, used = [], 0
        group.append(item)
        used += cost
    if group:
        yield group
