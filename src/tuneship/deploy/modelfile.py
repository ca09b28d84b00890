"""The Modelfile `ollama create NAME -f Modelfile` needs, generated from the run's ChatFormat.

Grammar (Ollama's parser): an instruction, then a value that is the rest of the line, or "..." or
\"\"\"...\"\"\" with no escape sequences. A value that contains \"\"\" cannot be written at all: then the
Modelfile is refused and `tuneship deploy` uses the REST API's JSON fields, which can carry anything.
Unknown PARAMETER keys are errors in Ollama, so they are refused here first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.errors import TuneshipError

VALID_PARAMETERS = {
    "num_ctx",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "seed",
    "num_predict",
    "stop",
}


WORD_THEN_VALUE = {"PARAMETER", "MESSAGE"}


class ModelfileError(TuneshipError):
    """A value cannot be expressed in Modelfile syntax, or a parameter is unknown to Ollama."""


@dataclass
class ModelSpec:
    """Everything Ollama needs: written as a Modelfile, or sent as /api/create fields."""

    gguf: Path
    template: str
    system: str | None
    stop: list[str]
    parameters: dict[str, float | int] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    license: str | None = None
    adapter: Path | None = None  # a LoRA GGUF applied on `gguf` (ADAPTER; the REST API's `adapters`)

    def all_parameters(self) -> dict:
        unknown = sorted(set(self.parameters) - VALID_PARAMETERS)
        if unknown:
            raise ModelfileError(
                f"deploy.parameters: {', '.join(unknown)} unknown to Ollama; valid: "
                f"{', '.join(sorted(VALID_PARAMETERS))}"
            )
        return {**self.parameters, "stop": list(self.stop)}


MESSAGES_RANGE = "{{ range .Messages }}"
END = "{{ end }}"
ACTION = re.compile(r"\{\{-?\s*(if|range|with|block|define|end)\b.*?\}\}", re.S)  # opens or closes a block


def system_first(template: str, messages: list[dict[str, str]]) -> str:
    """The TEMPLATE for a model with MESSAGE turns (few-shot): the system prompt first, then the turns, as
    llama.cpp renders them (the system prompt, the shots, the conversation: loop/shots.py `with_shots`).

    Ollama's /api/chat (server/routes.go ChatHandler) renders `Modelfile MESSAGEs + request messages`, and
    puts the Modelfile's SYSTEM before them only when the request's first message is no system message; then
    template/template.go `collate` merges consecutive messages of one role. So a request's own system message
    lands right after the N collated MESSAGE turns, at index N. This template renders, first, the system
    messages at index <= N (the request's own or SYSTEM's), then every other message in order: the same prompt
    either way. A later system message stays where it is. Templates that collect the system prompt themselves
    (mistral, gemma: several ranges) are returned unchanged: their output does not depend on where it is.
    """
    if not messages or template.count(MESSAGES_RANGE) != 1:
        return template
    head, _, rest = template.partition(MESSAGES_RANGE)
    close = _matching_end(rest)
    if close is None:
        return template
    body, tail = rest[: close.start()], rest[close.end() :]
    leading = f'and (eq .Role "system") (le $tuneshipIndex {len(collated_roles(messages))})'
    each = "{{ range $tuneshipIndex, $tuneshipMessage := .Messages }}"
    return f"{head}{each}{{{{ if {leading} }}}}{body}{END}{END}{each}{{{{ if not ({leading}) }}}}{body}{END}{END}{tail}"


def _matching_end(text: str) -> re.Match | None:
    """The `{{ end }}` that closes a block opened just before `text` (nested if/range/with counted)."""
    depth = 1
    for action in ACTION.finditer(text):
        depth += -1 if action.group(1) == "end" else 1
        if depth == 0:
            return action
    return None


def collated_roles(messages: list[dict[str, str]]) -> list[str]:
    """The roles of `messages` after Ollama's `collate` (consecutive messages of one role, except tool, merge)."""
    roles: list[str] = []
    for message in messages:
        if not roles or roles[-1] != message["role"] or message["role"] == "tool":
            roles.append(message["role"])
    return roles


def quote(value: str, what: str) -> str:
    if '"""' in value:
        raise ModelfileError(
            f'{what} contains """, which a Modelfile cannot express (no escapes); '
            "deploy through the REST API instead (tuneship deploy does)"
        )
    if "\n" in value or '"' in value or value != value.strip():
        return f'"""{value}"""'
    return f'"{value}"'


def file_reference(path: Path, relative_to: Path) -> str:
    """`./<path>` when the file is under `relative_to` (the Modelfile's folder), else its absolute path."""
    try:
        return f"./{path.resolve().relative_to(relative_to.resolve()).as_posix()}"
    except ValueError:
        return str(path.resolve())


def render_modelfile(spec: ModelSpec, relative_to: Path) -> str:
    lines = [f"FROM {file_reference(spec.gguf, relative_to)}"]
    if spec.adapter is not None:
        lines.append(f"ADAPTER {file_reference(spec.adapter, relative_to)}")
    lines.append(f"TEMPLATE {quote(spec.template, 'the template')}")
    if spec.system is not None:
        lines.append(f"SYSTEM {quote(spec.system, 'the system prompt')}")
    for key, value in spec.all_parameters().items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {quote(item, 'a stop string') if isinstance(item, str) else item}")
    for message in spec.messages:
        lines.append(f"MESSAGE {message['role']} {quote(message['content'], 'a MESSAGE')}")
    if spec.license:
        lines.append(f"LICENSE {quote(spec.license, 'the license')}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, value) pairs, following Ollama's grammar; used to prove what was written reads back.
    PARAMETER and MESSAGE take a word (the key, the role) before their value: "stop <|im_end|>", "user Hi"."""
    pairs, index = [], 0
    while index < len(text):
        end_of_line = text.find("\n", index)
        end_of_line = len(text) if end_of_line < 0 else end_of_line
        line = text[index:end_of_line]
        if not line.strip() or line.lstrip().startswith("#"):
            index = end_of_line + 1
            continue
        instruction, _, rest = line.strip().partition(" ")
        instruction = instruction.upper()
        start = index + line.index(rest) if rest else end_of_line
        word = ""
        if instruction in WORD_THEN_VALUE and rest:
            word, _, after = rest.partition(" ")
            value_text = after.lstrip(" ")
            start += len(rest) - len(value_text)
            rest, word = value_text, word + " "
        value, index = _quoted_value(text, start, rest, end_of_line)
        pairs.append((instruction, word + value))
    return pairs


def _quoted_value(text: str, start: int, rest: str, end_of_line: int) -> tuple[str, int]:
    """(the value that starts at `start`, where the next instruction starts)."""
    if rest.startswith('"""'):
        close = text.index('"""', start + 3)
        return text[start + 3 : close], close + 3
    if rest.startswith('"') and rest.rstrip().endswith('"') and len(rest.rstrip()) > 1:
        return rest.rstrip()[1:-1], end_of_line + 1
    return rest, end_of_line + 1
