"""`tuneship chat`: talk to an exported GGUF in the terminal, through llama.cpp."""

from __future__ import annotations

from pathlib import Path

from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.errors import TuneshipError


def find_chat_target(target: Path) -> tuple[Path, Path | None]:
    """(gguf file, run's ChatFormat folder or None for a bare GGUF)."""
    from tuneship.config import load_config
    from tuneship.run import Run

    if target.suffix == ".gguf":
        if not target.is_file():
            raise TuneshipError(f"{target}: no such GGUF file")
        return target, None
    if not (target / "config.yaml").is_file():
        raise TuneshipError(f"{target}: neither a .gguf file nor a run directory (no config.yaml)")
    run = Run.of(load_config(target / "config.yaml"), target)
    ggufs = run.model_ggufs()
    if not ggufs:
        raise TuneshipError(f"{target}: no exported GGUF in {run.gguf_dir}; run `tuneship export {target}` first")
    return ggufs[0], run.adapter_dir


def chat_loop(target: Path, console, max_new_tokens: int, read=input) -> None:
    gguf_path, format_dir = find_chat_target(target)
    console.print(f"chatting with {gguf_path.name} (empty line or /exit to quit)")
    if format_dir is None:
        _bare_gguf_loop(gguf_path, console, max_new_tokens, read)
        return
    from tuneship.chat.format import ChatFormat
    from tuneship.evaluate.backends import LlamaCppRunner

    chat_format = ChatFormat.load(format_dir)
    runner = LlamaCppRunner(gguf_path)
    history: list[Message] = []
    try:
        while (line := _prompt(read)) is not None:
            history.append(Message("user", line))
            prompt = chat_format.generation_prompt(Conversation(list(history), SourceRef("chat", len(history))))
            answer = runner.answer(chat_format, prompt, max_new_tokens)
            history.append(Message("assistant", answer.text))
            console.print(
                answer.text if answer.stopped else f"{answer.text} [red](cut at {max_new_tokens} tokens)[/]",
                highlight=False,
            )
    finally:
        runner.close()


def _bare_gguf_loop(gguf_path: Path, console, max_new_tokens: int, read) -> None:
    """A GGUF without a run: llama.cpp renders its own embedded chat template."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=2048, verbose=False, seed=0)
    messages: list[dict] = []
    while (line := _prompt(read)) is not None:
        messages.append({"role": "user", "content": line})
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=max_new_tokens)
        text = reply["choices"][0]["message"]["content"] or ""
        messages.append({"role": "assistant", "content": text})
        console.print(text, highlight=False)


def _prompt(read) -> str | None:
    try:
        line = read("you> ").strip()
    except EOFError:
        return None
    return None if line in ("", "/exit", "/quit") else line
