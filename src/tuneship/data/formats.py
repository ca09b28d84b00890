"""Every input format becomes a `Conversation` here, at the edge; nothing downstream knows them.

Formats, detected per record (or fixed with `data.format`):
- messages (OpenAI chat): {"messages": [{"role", "content"}, ...]}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
- alpaca: {"instruction", "input"?, "output"}
- prompt_completion: {"prompt", "completion"|"response"} (or your columns via `data.columns`)
- plain_text: {"text": "### Human: ... ### Assistant: ..."} (the speaker markers of `TRANSCRIPT_MARKER`); transcript
  files (.txt, .md) become such records, one per conversation (see `transcript_blocks` in sources.py)

Any of them may carry preference fields for train.objective dpo/kto: "rejected" (the rejected last answer of a
DPO pair; the record's own last answer is the chosen one) or "label" (KTO: true when the last answer is
desirable, false when not).
"""

from __future__ import annotations

import re
from typing import Any

from tuneship.data.conversation import ROLES, Conversation, Message, SourceRef
from tuneship.data.findings import RecordError

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
# `### Speaker:` anywhere (seed data often has a whole conversation on one line), bare `Speaker:` at a line start.
TRANSCRIPT_MARKER = re.compile(
    r"[ \t]*###[ \t]*(human|user|assistant|system|instruction|input|response)[ \t]*:"
    r"|^[ \t]*(human|user|assistant|system)[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
NO_SPEAKER = (
    "text that no speaker marker introduces (a turn with no speaker); start it with ### Human:, User:, "
    "### Assistant:, ... or remove it"
)
MARKER_ROLES = {
    "human": "user",
    "user": "user",
    "instruction": "user",
    "input": "input",  # alpaca's input: appended to the instruction, as the alpaca format does
    "assistant": "assistant",
    "response": "assistant",
    "system": "system",
}


def detect_format(record: dict[str, Any], columns: dict[str, str]) -> str:
    if columns.get("prompt", "") in record and columns.get("response", "") in record:
        return "prompt_completion"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    if isinstance(record.get("text"), str) and TRANSCRIPT_MARKER.search(record["text"]):
        return "plain_text"
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise RecordError(
        "invalid-record",
        f"unknown record format (keys: {keys}); expected messages, conversations, instruction/output, "
        "prompt/completion or text with ### Human:/### Assistant:; map other names with data.columns",
    )


def to_conversation(
    record: Any, source: SourceRef, fmt: str = "auto", columns: dict[str, str] | None = None
) -> Conversation:
    """Convert one raw record; raises RecordError with a finding code when it cannot."""
    columns = columns or {}
    if not isinstance(record, dict):
        raise RecordError("invalid-record", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, columns)
    converter = _CONVERTERS[fmt]
    messages, raw_roles = converter(record, columns)
    conversation = _build(messages, raw_roles, source)
    conversation.rejected, conversation.label = _preference_fields(record, conversation)
    return conversation


def _preference_fields(record: dict, conversation: Conversation) -> tuple[str | None, bool | None]:
    """("rejected", "label") of a preference record, checked: a pair's answers must differ."""
    rejected, label = record.get("rejected"), record.get("label")
    if label is not None and not isinstance(label, bool):
        raise RecordError("invalid-record", f"must be true or false, got {label!r}", "label")
    if rejected is None:
        return None, label
    if label is not None:
        raise RecordError(
            "invalid-record", "a record is a DPO pair (rejected) or a KTO answer (label), not both", "label"
        )
    if not isinstance(rejected, str):
        raise RecordError("invalid-record", f"must be a string, got {type(rejected).__name__}", "rejected")
    if not rejected.strip():
        raise RecordError("empty-response", "the rejected answer is empty; write it or remove the record", "rejected")
    if rejected.strip() == conversation.messages[-1].content.strip():
        raise RecordError("same-answers", "the rejected answer is the chosen one; nothing to prefer", "rejected")
    return rejected, None


def _turn_list(record: dict, key: str, role_key: str, content_key: str):
    """messages / sharegpt: a list of turns, each an object with a role and a content field."""
    turns = _require_list(record, key)
    messages, raw_roles = [], []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise RecordError("invalid-record", f"each turn must be an object with {role_key} and {content_key}", where)
        raw_roles.append(_require_str(turn, role_key, where))
        messages.append((turn[role_key], _require_str(turn, content_key, where), where))
    return messages, raw_roles


def _from_messages(record, columns):
    return _turn_list(record, "messages", "role", "content")


def _from_sharegpt(record, columns):
    return _turn_list(record, "conversations", "from", "value")


def _from_alpaca(record, columns):
    instruction = _require_str(record, "instruction")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError("invalid-record", f"must be a string, got {type(extra).__name__}", "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [("user", prompt, "instruction"), ("assistant", _require_str(record, "output"), "output")]
    return _with_system(record, columns, messages), ["instruction", "output"]


def _from_prompt_completion(record, columns):
    prompt_key = columns.get("prompt", "prompt")
    response_key = columns.get("response") or ("completion" if "completion" in record else "response")
    messages = [
        ("user", _require_str(record, prompt_key), prompt_key),
        ("assistant", _require_str(record, response_key), response_key),
    ]
    return _with_system(record, columns, messages), [prompt_key, response_key]


def marker_label(match: re.Match) -> str:
    return (match.group(1) or match.group(2)).lower()


def transcript_turns(text: str) -> list[tuple[str, str]]:
    """(label, content) of each speaker turn; `### Input:` joins the instruction before it."""
    matches = list(TRANSCRIPT_MARKER.finditer(text))
    before = text[: matches[0].start()] if matches else text
    if before.strip():
        raise RecordError("role-order", NO_SPEAKER, "text")
    turns: list[tuple[str, str]] = []
    ends = [m.start() for m in matches[1:]] + [len(text)]
    for match, end in zip(matches, ends):
        label, content = marker_label(match), text[match.end() : end].strip()
        if MARKER_ROLES[label] == "input":
            if not turns or MARKER_ROLES[turns[-1][0]] != "user":
                raise RecordError("role-order", "### Input: must follow an ### Instruction:", f"turn {len(turns) + 1}")
            previous_label, previous = turns[-1]
            turns[-1] = (previous_label, f"{previous}\n\n{content}" if content else previous)
            continue
        turns.append((label, content))
    return turns


def _from_plain_text(record, columns):
    turns = transcript_turns(_require_str(record, "text"))
    messages = [(MARKER_ROLES[label], content, f"turn {n}") for n, (label, content) in enumerate(turns, start=1)]
    return messages, [label for label, _ in turns]


def _with_system(record, columns, messages):
    system_key = columns.get("system", "system")
    system = record.get(system_key)
    if system is None:
        return messages
    if not isinstance(system, str):
        raise RecordError("invalid-record", f"must be a string, got {type(system).__name__}", system_key)
    return [("system", system, system_key)] + messages


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "plain_text": _from_plain_text,
}


def _build(messages: list[tuple[str, str, str]], raw_roles: list[str], source: SourceRef) -> Conversation:
    """Map roles, take a leading system message aside, and check the turn order and contents."""
    mapped = []
    for role, content, where in messages:
        canonical = ROLE_ALIASES.get(role.strip().lower())
        if canonical is None:
            raise RecordError(
                "unknown-role",
                f"role {role!r} is not one of {', '.join(ROLES)} (or human/gpt); tool calls are not supported yet",
                where,
            )
        mapped.append((canonical, content, where))
    system = None
    if mapped and mapped[0][0] == "system":
        system = mapped.pop(0)[1]
    _check_order(mapped)
    for role, content, where in mapped:
        if not content.strip():
            code = "empty-prompt" if role == "user" else "empty-response"
            raise RecordError(code, f"the {role} turn is empty; write it or remove the record", where)
    return Conversation([Message(r, c) for r, c, _ in mapped], source, system, raw_roles)


def _check_order(mapped: list[tuple[str, str, str]]) -> None:
    if not mapped:
        raise RecordError("role-order", "the conversation has no user/assistant turns")
    for index, (role, _, where) in enumerate(mapped):
        expected = "user" if index % 2 == 0 else "assistant"
        if role == "system":
            raise RecordError("role-order", "a system message is only allowed first", where)
        if role != expected:
            raise RecordError(
                "role-order", f"expected a {expected} turn here (turns must alternate, starting with user)", where
            )
    if mapped[-1][0] != "assistant":
        raise RecordError("role-order", "the conversation ends without an assistant answer", mapped[-1][2])


def _require_list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list):
        raise RecordError("invalid-record", f"must be a list, got {type(value).__name__}", key)
    return value


def _require_str(record: dict, key: str, where: str | None = None) -> str:
    field = f"{where}.{key}" if where else key
    if key not in record or record[key] is None:
        raise RecordError("invalid-record", "missing field", field)
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RecordError("invalid-record", f"must be a string, got {type(value).__name__}", field)
    return value
