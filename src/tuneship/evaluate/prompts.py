"""The prompt set every model of a run is checked on: the same prompts for HF, merged and GGUF."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.data.conversation import Conversation, Message, SourceRef, read_conversations
from tuneship.data.findings import RecordError
from tuneship.data.formats import to_conversation
from tuneship.data.sources import read_file
from tuneship.errors import DataError

if TYPE_CHECKING:
    from tuneship.config import EvalSection


@dataclass
class EvalPrompt:
    id: str
    origin: str
    conversation: Conversation
    expected: str | None

    @property
    def question(self) -> str:
        return (
            self.conversation.messages[-1].content if self.expected is None else self.conversation.messages[-2].content
        )

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "origin": self.origin,
            "question": self.question,
            "expected": self.expected,
            "source": str(self.conversation.source),
        }


def build_prompt_set(data_dir: Path, eval_cfg: EvalSection) -> list[EvalPrompt]:
    """Prompts from eval.prompts, then the eval split, then eval.train_prompts training examples."""
    prompts: list[EvalPrompt] = []
    if eval_cfg.prompts:
        prompts += [_with_expected(c, "prompts") for c in _read_prompt_file(Path(eval_cfg.prompts))]
    for origin, limit in (("eval", eval_cfg.max_prompts), ("train", eval_cfg.train_prompts)):
        path = data_dir / f"{origin}.jsonl"
        if limit and path.is_file():
            desirable = [c for c in read_conversations(path) if c.is_desirable]  # a KTO negative is no expected answer
            prompts += [_with_expected(c, origin) for c in desirable[:limit]]
    if not prompts:
        raise DataError(
            "no prompts to evaluate: the eval split is empty; set data.eval_ratio, eval.prompts "
            "(a JSONL file of questions and expected answers) or eval.train_prompts"
        )
    return prompts


def _with_expected(conversation: Conversation, origin: str) -> EvalPrompt:
    last = conversation.messages[-1]
    expected = last.content if last.role == "assistant" else None
    return EvalPrompt(f"{origin}:{conversation.source.line}", origin, conversation, expected)


def _read_prompt_file(path: Path) -> list[Conversation]:
    """Any training format; a record with only a prompt (no answer) is checked without expectations."""
    if not path.is_file():
        raise DataError(f"eval.prompts={path}: no such file")
    conversations = []
    for raw in read_file(path):
        where = f"{raw.file}:{raw.line}"
        if raw.error is not None:
            raise DataError(f"{where}: {raw.error}")
        source = SourceRef(raw.file, raw.line)
        if isinstance(raw.data, dict) and set(raw.data) <= {"prompt", "system"} and "prompt" in raw.data:
            conversations.append(
                Conversation([Message("user", str(raw.data["prompt"]))], source, raw.data.get("system"))
            )
            continue
        try:
            conversations.append(to_conversation(raw.data, source))
        except RecordError as exc:
            raise DataError(f"{where}{f' [{exc.field}]' if exc.field else ''}: {exc}") from None
    return conversations
