"""A few-shot version's shots: example turns put before every conversation it answers (gate, smoke test, serving),
and the tokens they take."""

from __future__ import annotations

from dataclasses import replace

from tuneship.chat.format import ChatFormat
from tuneship.data.conversation import Conversation, Message
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.loop.tables import Example

PROBE_QUESTION = [{"role": "user", "content": "?"}]


def with_shots(conversation: Conversation, shots: list[dict]) -> Conversation:
    """The conversation a few-shot version answers: its system prompt, the shot turns, then its own turns."""
    if not shots:
        return conversation
    turns = [Message(shot["role"], shot["content"]) for shot in shots]
    return Conversation(turns + conversation.messages, conversation.source, conversation.system)


def prompts_with_shots(prompts: list[EvalPrompt], shots: list[dict]) -> list[EvalPrompt]:
    """Eval prompts (gate, smoke test) as a few-shot version sees them; expected answers unchanged."""
    return [replace(p, conversation=with_shots(p.conversation, shots)) for p in prompts]


def shot_tokens(chat_format: ChatFormat, shots: list[dict]) -> int:
    """Tokens the shot turns add to a rendered prompt (a default system prompt the template adds counts once)."""
    if not shots:
        return 0

    def prompt_length(messages: list[dict]) -> int:
        return len(chat_format.encode(chat_format.render_text(messages, add_generation_prompt=True)))

    return prompt_length(shots + PROBE_QUESTION) - prompt_length(PROBE_QUESTION)


def shot_turns(examples: list[Example]) -> list[dict]:
    """The examples' turns, oldest first (the newest correction sits nearest the question); no system prompt:
    the conversation being answered keeps its own."""
    return [
        {"role": m["role"], "content": m["content"]} for e in reversed(examples) for m in e.conversation["messages"]
    ]
