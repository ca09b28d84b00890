"""Generate answers to the prompt set with each kind of artifact: HF model or GGUF in llama.cpp.

Every backend renders prompts with the run's ChatFormat and decodes greedily, so differences
between columns of the report come from the artifact, not from the harness.
"""

from __future__ import annotations

from pathlib import Path

from tuneship.chat.generation import Answer, generate_answers


def hf_answers(model, chat_format, prompts, max_new_tokens: int) -> list[Answer]:
    return generate_answers(
        model, chat_format, [chat_format.generation_prompt(p.conversation) for p in prompts], max_new_tokens
    )


class LlamaCppRunner:
    """A GGUF loaded in llama.cpp (llama-cpp-python), greedy, with the run's stop tokens."""

    def __init__(self, gguf_path: Path, n_ctx: int = 2048, lora_path: Path | None = None):
        from llama_cpp import Llama

        kwargs = {"lora_path": str(lora_path)} if lora_path else {}
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, seed=0, verbose=False, **kwargs)
        self.prompt_token_mismatches = 0

    def answer(self, chat_format, prompt_text: str, max_new_tokens: int) -> Answer:
        tokens = self.llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)
        if tokens != chat_format.encode(prompt_text):
            self.prompt_token_mismatches += 1
        stop_ids = set(chat_format.spec.stop_token_ids)
        generated: list[int] = []
        for token in self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop_ids or self.llm.token_eos() == token:
                return Answer(self._text(generated), token in stop_ids, len(generated) + 1)
            generated.append(token)
            if len(generated) >= max_new_tokens:
                break
        return Answer(self._text(generated), False, len(generated))

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens, special=True).decode("utf-8", "replace").strip()

    def close(self) -> None:
        self.llm.close()


def gguf_answers(
    gguf_path: Path, chat_format, prompts, max_new_tokens: int, n_ctx: int = 2048, lora_path: Path | None = None
) -> tuple[list[Answer], int]:
    """Answers and how many prompts llama.cpp tokenized differently from the HF tokenizer."""
    runner = LlamaCppRunner(gguf_path, n_ctx, lora_path)
    try:
        answers = [
            runner.answer(chat_format, chat_format.generation_prompt(p.conversation), max_new_tokens) for p in prompts
        ]
    finally:
        runner.close()
    return answers, runner.prompt_token_mismatches
