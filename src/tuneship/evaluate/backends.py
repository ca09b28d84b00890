"""Generate answers to the prompt set with each kind of artifact: HF model or GGUF in llama.cpp.

Every backend renders prompts with the run's ChatFormat and decodes greedily, so differences
between columns of the report come from the artifact, not from the harness.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneship.chat.generation import Answer, generate_answers

LOADER_CONTEXT = 64  # the context a Llama loads the model with when the answers come from llama_parallel


def hf_answers(model, chat_format, prompts, max_new_tokens: int) -> list[Answer]:
    return generate_answers(
        model, chat_format, [chat_format.generation_prompt(p.conversation) for p in prompts], max_new_tokens
    )


class LlamaCppRunner:
    """A GGUF loaded in llama.cpp (llama-cpp-python), greedy, with the run's stop tokens, for one conversation at a
    time (`tuneship chat`, the server); prompt sets go through `generate_with_gguf`."""

    def __init__(self, gguf_path: Path, n_ctx: int = 2048, lora_path: Path | None = None):
        kwargs = {"lora_path": str(lora_path)} if lora_path else {}
        self.llm = load_gguf(gguf_path, n_ctx, **kwargs)
        self.prompt_token_mismatches = 0

    def answer(self, chat_format, prompt_text: str, max_new_tokens: int) -> Answer:
        tokens = self.llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)
        if tokens != chat_format.encode(prompt_text):
            self.prompt_token_mismatches += 1
        stop_ids = set(chat_format.spec.stop_token_ids)
        generated: list[int] = []
        end = None
        for token in self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop_ids or self.llm.token_eos() == token:
                end = token
                break
            generated.append(token)
            if len(generated) >= max_new_tokens:
                break
        return _answer(self.llm, generated, end, stop_ids)

    def close(self) -> None:
        self.llm.close()


def load_gguf(gguf_path: Path, n_ctx: int, **kwargs):
    """A llama_cpp.Llama, quiet, one thread per physical core or OMP_NUM_THREADS (llama-cpp-python's default,
    half the logical CPUs, is one thread on a 2-core machine)."""
    from llama_cpp import Llama

    from tuneship.train.precision import compute_threads

    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, seed=0, verbose=False, n_threads=compute_threads(), **kwargs)


def _answer(llm, generated: list[int], end: int | None, stop_ids: set[int]) -> Answer:
    text = llm.detokenize(generated, special=True).decode("utf-8", "replace").strip()
    return Answer(text, end in stop_ids, len(generated) + (end is not None))


@dataclass
class GGUFGeneration:
    """A GGUF's answers to a prompt set, how many prompts llama.cpp tokenized differently from the HF
    tokenizer, each prompt's token ids with its answer's (export scores quants on the latter), and with
    `keep_logits_bytes` the logits each answer's tokens were chosen from (rows, vocab) per prompt, when they fit."""

    answers: list[Answer]
    prompt_token_mismatches: int
    token_ids: list[tuple[list[int], list[int]]]
    answer_logits: list | None = None


def generate_with_gguf(
    gguf_path: Path,
    chat_format,
    prompts,
    max_new_tokens: int,
    lora_path: Path | None = None,
    keep_logits_bytes: int = 0,
) -> GGUFGeneration:
    """Every prompt rendered by the ChatFormat and answered greedily by the GGUF in llama.cpp, all prompts decoded
    together (evaluate/llama_parallel.py), answers in prompt order."""
    from tuneship.evaluate.llama_parallel import greedy_continuations

    llm = load_gguf(gguf_path, LOADER_CONTEXT)  # its own context stays unused: the answers get a batched one
    try:
        texts = [chat_format.generation_prompt(prompt.conversation) for prompt in prompts]
        tokens = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in texts]
        mismatches = sum(ids != chat_format.encode(text) for ids, text in zip(tokens, texts))
        stop_ids = set(chat_format.spec.stop_token_ids)
        continuations = greedy_continuations(llm, tokens, max_new_tokens, stop_ids, lora_path, keep_logits_bytes)
        answers = [_answer(llm, c.answer, c.end, stop_ids) for c in continuations]
    finally:
        llm.close()
    token_ids = [(c.prompt, c.answer if c.end is None else [*c.answer, c.end]) for c in continuations]
    kept = all(c.logits is not None for c in continuations) and keep_logits_bytes > 0
    logits = [_stacked(c.logits) for c in continuations] if kept else None
    return GGUFGeneration(answers, mismatches, token_ids, logits)


def _stacked(rows: list):
    import numpy as np

    return np.stack(rows)


def gguf_answers(
    gguf_path: Path, chat_format, prompts, max_new_tokens: int, lora_path: Path | None = None
) -> tuple[list[Answer], int]:
    """Answers and how many prompts llama.cpp tokenized differently from the HF tokenizer."""
    generation = generate_with_gguf(gguf_path, chat_format, prompts, max_new_tokens, lora_path)
    return generation.answers, generation.prompt_token_mismatches
