"""Audit findings: a stable code, a severity, where it is, and what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning"]

# code -> what it means; the README's audit table is generated from the same words.
CODES: dict[str, str] = {
    "malformed-json": "a line or file is not valid JSON",
    "invalid-record": "wrong types or missing fields for the record's format",
    "encoding": "bytes that are not UTF-8, or text damaged by a wrong decoding (mojibake)",
    "empty-prompt": "a user turn is empty",
    "empty-response": "an assistant turn is empty",
    "unknown-role": "a role that is not system/user/assistant (after mapping human/gpt/...)",
    "role-order": "turns do not alternate user/assistant, start with assistant, or end without an answer",
    "duplicate": "the same conversation again (exact, after canonicalization); the first is kept",
    "near-duplicate": "almost the same text as another record (case, spaces, punctuation, few words)",
    "percent-scale": "a fraction printed as a percent, e.g. 0.6622% where 66.22% was meant",
    "truncated": "longer than train.max_seq_len: the end of the answer and its stop token would be cut",
    "same-answers": "a preference pair whose rejected answer is the chosen one: nothing to prefer",
    "objective-mismatch": "a record train.objective cannot train on (dpo: no rejected answer; sft: label false)",
    "transcript-split": "how a transcript file was cut into examples (conversations or pairs); data.transcripts",
    "offline-copy": "an s3:// source read from the local mirror because the endpoint did not answer; may be stale",
}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    file: str
    line: int
    message: str
    field: str | None = None

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}")

    @property
    def location(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where} [{self.field}]" if self.field else where

    def to_json(self) -> dict:
        return asdict(self)


class RecordError(Exception):
    """Raised while converting one record; becomes an error finding and drops the record."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field
