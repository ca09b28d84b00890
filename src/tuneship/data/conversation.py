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
    messages: list[Message]
    source: SourceRef
    system: str | None = None
    raw_roles: list[str] = field(default_factory=list)

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
        return {
            "system": self.system,
            "messages": [asdict(m) for m in self.messages],
            "source": asdict(self.source),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        return cls(
            messages=[Message(**m) for m in data["messages"]],
            source=SourceRef(**data["source"]),
            system=data.get("system"),
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
