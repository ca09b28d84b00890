"""The one canonical record. Every input format becomes a `Conversation` at the edge."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SourceRef:
    """Where a record came from: a file (or s3:// URI) and its line (row for CSV/Parquet)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Conversation:
    """A conversation; for preference training also the rejected last answer (a DPO pair) or whether the last
    answer is desirable (KTO; None counts as desirable)."""

    messages: list[Message]
    source: SourceRef
    system: str | None = None
    raw_roles: list[str] = field(default_factory=list)
    rejected: str | None = None
    label: bool | None = None

    @property
    def is_desirable(self) -> bool:
        """Whether the last answer is one to learn (and to expect): not a KTO negative."""
        return self.label is not False

    def with_answer(self, answer: str) -> Conversation:
        """The same conversation with another last answer (a DPO pair's rejected one)."""
        messages = [*self.messages[:-1], Message("assistant", answer)]
        return Conversation(messages, self.source, self.system, self.raw_roles)

    @property
    def assistant_turns(self) -> list[Message]:
        return [m for m in self.messages if m.role == "assistant"]

    def chat_messages(self, default_system: str | None = None) -> list[dict[str, str]]:
        """Messages as chat-template input: the system prompt (own or default) first, if any."""
        system = self.system if self.system is not None else default_system
        head = [{"role": "system", "content": system}] if system is not None else []
        return head + [{"role": m.role, "content": m.content} for m in self.messages]

    def prompt_messages(self, default_system: str | None = None) -> list[dict[str, str]]:
        """The messages an inference request sends: all but a final assistant answer."""
        messages = self.chat_messages(default_system)
        return messages[:-1] if messages[-1]["role"] == "assistant" else messages

    def to_json(self) -> dict[str, Any]:
        preference = {
            key: value for key, value in (("rejected", self.rejected), ("label", self.label)) if value is not None
        }
        return {
            "system": self.system,
            "messages": [asdict(m) for m in self.messages],
            "source": asdict(self.source),
            **preference,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        return cls(
            messages=[Message(**m) for m in data["messages"]],
            source=SourceRef(**data["source"]),
            system=data.get("system"),
            rejected=data.get("rejected"),
            label=data.get("label"),
        )


def write_jsonl(path, rows) -> int:
    """Write dicts as JSON lines; returns how many were written."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_conversations(path) -> list[Conversation]:
    with open(path, encoding="utf-8") as lines:
        return [Conversation.from_json(json.loads(line)) for line in lines if line.strip()]
