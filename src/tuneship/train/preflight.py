"""Checks before any training: would these examples teach the model to answer and to stop?"""

from __future__ import annotations

from tuneship.chat.format import ChatFormat, Rendered
from tuneship.data.conversation import Conversation
from tuneship.errors import PreflightError

EXAMPLES_NAMED = 5


def preflight(
    chat_format: ChatFormat, conversations: list[Conversation], rendered: list[Rendered], max_seq_len: int
) -> None:
    """Raise PreflightError naming the examples that would train the wrong thing."""
    stop_id = chat_format.spec.stop_token_ids[0]
    problems: dict[str, list[str]] = {}
    for conversation, example in zip(conversations, rendered):
        where = str(conversation.source)
        supervised = [label for label in example.labels if label != -100]
        if not supervised:
            problems.setdefault("have no supervised token (nothing to learn)", []).append(where)
        elif supervised.count(stop_id) < len(example.spans):
            problems.setdefault(
                f"do not supervise the stop token {chat_format.spec.stop_token!r} at the end of "
                "every answer (the model would not learn to stop)",
                [],
            ).append(where)
        if len(example.input_ids) > max_seq_len:
            problems.setdefault(
                f"are longer than train.max_seq_len={max_seq_len} (run the data stage, "
                "which drops them into dropped.jsonl)",
                [],
            ).append(where)
    if problems:
        lines = [
            f"{len(where)} of {len(rendered)} examples {what}: {', '.join(where[:EXAMPLES_NAMED])}"
            + (" ..." if len(where) > EXAMPLES_NAMED else "")
            for what, where in problems.items()
        ]
        raise PreflightError("pre-flight check failed, nothing was trained:\n  " + "\n  ".join(lines))
