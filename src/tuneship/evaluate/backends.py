"""Generate answers to the prompt set with each kind of artifact: HF model or GGUF in llama.cpp.

Every backend renders prompts with the run's ChatFormat and decodes greedily, so differences
between columns of the report come from the artifact, not from the harness.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneship.chat.generation import Answer, generate_answers


def hf_answers(model, chat_format, prompts, max_new_tokens: int) -> list[Answer]:
    return generate_answers(
        model, chat_format, [chat_format.generation_prompt(p.conversation) for p in prompts], max_new_tokens
    )


class LlamaCppRunner:
    """A GGUF loaded in llama.cpp (llama-cpp-python), greedy, with the run's stop tokens, one thread per
    physical core (llama-cpp-python's default, half the logical CPUs, is one thread on a 2-core machine)."""

    def __init__(self, gguf_path: Path, n_ctx: int = 2048, lora_path: Path | None = None):
        from llama_cpp import Llama

        from tuneship.train.precision import physical_cores

        kwargs = {"lora_path": str(lora_path)} if lora_path else {}
        self.llm = Llama(
            model_path=str(gguf_path), n_ctx=n_ctx, seed=0, verbose=False, n_threads=physical_cores(), **kwargs
        )
        self.prompt_token_mismatches = 0
        self.last_token_ids: tuple[list[int], list[int]] = ([], [])  # prompt, answer (with the token that ended it)

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
        self.last_token_ids = (tokens, generated if end is None else [*generated, end])
        if end is None:
            return Answer(self._text(generated), False, len(generated))
        return Answer(self._text(generated), end in stop_ids, len(generated) + 1)

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens, special=True).decode("utf-8", "replace").strip()

    def close(self) -> None:
        self.llm.close()


@dataclass
class GGUFGeneration:
    """A GGUF's answers to a prompt set, how many prompts llama.cpp tokenized differently from the HF
    tokenizer, and each prompt's token ids with its answer's (export scores quants on the latter)."""

    answers: list[Answer]
    prompt_token_mismatches: int
    token_ids: list[tuple[list[int], list[int]]]


def generate_with_gguf(
    gguf_path: Path, chat_format, prompts, max_new_tokens: int, n_ctx: int = 2048, lora_path: Path | None = None
) -> GGUFGeneration:
    """Every prompt rendered by the ChatFormat and answered greedily by the GGUF in llama.cpp, in order."""
    runner = LlamaCppRunner(gguf_path, n_ctx, lora_path)
    answers, token_ids = [], []
    try:
        for prompt in prompts:
            answers.append(
                runner.answer(chat_format, chat_format.generation_prompt(prompt.conversation), max_new_tokens)
            )
            token_ids.append(runner.last_token_ids)
    finally:
        runner.close()
    return GGUFGeneration(answers, runner.prompt_token_mismatches, token_ids)


def gguf_answers(
    gguf_path: Path, chat_format, prompts, max_new_tokens: int, n_ctx: int = 2048, lora_path: Path | None = None
) -> tuple[list[Answer], int]:
    """Answers and how many prompts llama.cpp tokenized differently from the HF tokenizer."""
    generation = generate_with_gguf(gguf_path, chat_format, prompts, max_new_tokens, n_ctx, lora_path)
    return generation.answers, generation.prompt_token_mismatches
