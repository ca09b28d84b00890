"""The data audit: every record read is either kept or dropped, with findings that say why.

Invariant (tested): records read == kept + dropped, malformed lines included.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tuneship.data.conversation import Conversation, SourceRef
from tuneship.data.findings import Finding, RecordError
from tuneship.data.formats import detect_format, to_conversation
from tuneship.data.near_duplicates import NearDuplicateIndex
from tuneship.data.percent_scale import find_percent_scale
from tuneship.data.sources import RawRecord, damaged_text


@dataclass(frozen=True)
class TokenCount:
    """Token length of a rendered conversation, and where its last answer starts."""

    total: int
    answer_start: int


Measure = Callable[[Conversation], TokenCount]


@dataclass
class AuditSettings:
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    near_duplicate_similarity: float = 0.9
    max_seq_len: int | None = None
    measure: Measure | None = None
    objective: str = "sft"  # train.objective: which records can be trained on (see `_objective_error`)
    transcripts: str = "auto"  # data.transcripts: how .txt/.md transcripts split (see sources.transcript_blocks)


@dataclass
class AuditResult:
    records_read: int
    kept: list[Conversation]
    groups: list[int]
    dropped: list[dict]
    findings: list[Finding]
    stats: dict

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """code -> {"error": n, "warning": m}."""
        counts: dict[str, dict[str, int]] = {}
        for finding in self.findings:
            counts.setdefault(finding.code, {"error": 0, "warning": 0})[finding.severity] += 1
        return dict(sorted(counts.items()))

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for f in self.findings if f.severity == "warning")


class _Auditor:
    def __init__(self, settings: AuditSettings):
        self.settings = settings
        self.read = 0
        self.kept: list[Conversation] = []
        self.groups: list[int] = []
        self.dropped: list[dict] = []
        self.findings: list[Finding] = []
        self.seen_exact: dict[str, SourceRef] = {}
        self.near_index = NearDuplicateIndex(settings.near_duplicate_similarity)
        self.formats: Counter = Counter()
        self.per_source: dict[str, Counter] = {}
        self.token_lengths: list[int] = []

    def add(self, raw: RawRecord) -> None:
        self.read += 1
        self.per_source.setdefault(raw.file, Counter())["read"] += 1
        if raw.error is not None:
            self._drop(raw, [self._finding(raw.error, raw.file, raw.line)])
            return
        source = SourceRef(raw.file, raw.line)
        try:
            conversation = self._convert(raw.data, source)
        except RecordError as exc:
            self._drop(raw, [self._finding(exc, raw.file, raw.line)])
            return
        errors = self._record_errors(conversation)
        if errors:
            self._drop(raw, errors)
            return
        self._keep(conversation)

    def _convert(self, data, source: SourceRef) -> Conversation:
        fmt = self.settings.format
        if fmt == "auto" and isinstance(data, dict):
            fmt = detect_format(data, self.settings.columns)
        conversation = to_conversation(data, source, fmt, self.settings.columns)
        self.formats[fmt] += 1
        return conversation

    def _record_errors(self, conversation: Conversation) -> list[Finding]:
        """Error findings that drop a converted record (warnings are recorded on the way)."""
        source = conversation.source
        errors = []
        for index, text in enumerate(_texts(conversation)):
            reason = damaged_text(text)
            if reason:
                severity = "error" if "\ufffd" in text else "warning"
                finding = Finding(
                    "encoding",
                    severity,
                    source.file,
                    source.line,
                    reason + "; fix the file's encoding",
                    _text_field(conversation, index),
                )
                (errors if severity == "error" else self.findings).append(finding)
        key = _exact_key(conversation)
        if key in self.seen_exact:
            errors.append(
                Finding(
                    "duplicate",
                    "error",
                    source.file,
                    source.line,
                    f"same conversation as {self.seen_exact[key]}; the first one is kept",
                )
            )
        mismatch = _objective_error(conversation, self.settings.objective)
        if mismatch:
            errors.append(mismatch)
        truncation = self._truncation(conversation)
        if truncation:
            errors.append(truncation)
        if not errors:
            self.seen_exact[key] = source
        return errors

    def _truncation(self, conversation: Conversation) -> Finding | None:
        measure, limit = self.settings.measure, self.settings.max_seq_len
        if measure is None or limit is None:
            return None
        answers = [conversation] + ([conversation.with_answer(conversation.rejected)] if conversation.rejected else [])
        count = max((measure(c) for c in answers), key=lambda c: c.total)  # a pair is cut when either answer is
        self.token_lengths.append(count.total)
        if count.total <= limit:
            return None
        over = count.total - limit
        if count.answer_start >= limit:
            cut = "the whole last answer and its stop token would be cut"
        else:
            cut = f"the last {over} tokens of the answer and its stop token would be cut"
        return Finding(
            "truncated",
            "error",
            conversation.source.file,
            conversation.source.line,
            f"{count.total} tokens, {over} over train.max_seq_len={limit}: {cut}; "
            "shorten it, split it, or raise train.max_seq_len",
        )

    def _keep(self, conversation: Conversation) -> None:
        source = conversation.source
        match, similarity = self.near_index.add(_joined_text(conversation))
        if match is not None:
            other = self.kept[match].source
            self.findings.append(
                Finding(
                    "near-duplicate",
                    "warning",
                    source.file,
                    source.line,
                    f"{similarity:.0%} similar to {other} (normalized); kept, and kept on the same side of the split",
                )
            )
            self.groups.append(self.groups[match])
        else:
            self.groups.append(len(self.kept))
        self.kept.append(conversation)
        self.per_source[source.file]["kept"] += 1

    def _drop(self, raw: RawRecord, findings: list[Finding]) -> None:
        self.findings.extend(findings)
        self.per_source[raw.file]["dropped"] += 1
        self.dropped.append(
            {
                "source": {"file": raw.file, "line": raw.line},
                "codes": sorted({f.code for f in findings}),
                "reasons": [f"{f.location}: {f.message}" for f in findings],
                "record": raw.data,
                "raw_text": None if raw.data is not None else raw.raw_text,
            }
        )

    @staticmethod
    def _finding(error: RecordError, file: str, line: int) -> Finding:
        return Finding(error.code, "error", file, line, str(error), error.field)

    def percent_scale(self) -> None:
        answers = ["\n".join(m.content for m in c.assistant_turns) for c in self.kept]
        locations = [str(c.source) for c in self.kept]
        for flag in find_percent_scale(answers, locations):
            source = self.kept[flag.index].source
            self.findings.append(Finding("percent-scale", "warning", source.file, source.line, flag.reason))

    def result(self) -> AuditResult:
        self.percent_scale()
        self.findings.sort(key=lambda f: (f.file, f.line, f.code))
        return AuditResult(self.read, self.kept, self.groups, self.dropped, self.findings, self._stats())

    def _stats(self) -> dict:
        turns = Counter(len(c.messages) for c in self.kept)
        roles = Counter(role for c in self.kept for role in c.raw_roles)
        stats = {
            "records_read": self.read,
            "kept": len(self.kept),
            "dropped": len(self.dropped),
            "per_source": {name: dict(counts) for name, counts in self.per_source.items()},
            "formats": dict(self.formats),
            "turns_per_conversation": dict(sorted(turns.items())),
            "with_system_prompt": sum(1 for c in self.kept if c.system is not None),
            "roles_as_written": dict(roles.most_common()),
        }
        if self.token_lengths:
            stats["tokens"] = _length_stats(self.token_lengths)
        return stats


def audit(records: Iterable[RawRecord], settings: AuditSettings) -> AuditResult:
    auditor = _Auditor(settings)
    for raw in records:
        auditor.add(raw)
    return auditor.result()


def _objective_error(conversation: Conversation, objective: str) -> Finding | None:
    """dpo trains on pairs only; sft never learns an answer labelled undesirable (kto takes every record: one
    without a label is desirable)."""
    source = conversation.source
    if objective == "dpo" and conversation.rejected is None:
        why = 'train.objective=dpo needs a rejected answer on every record; add "rejected" or train with sft/kto'
        return Finding("objective-mismatch", "error", source.file, source.line, why, "rejected")
    if objective == "sft" and not conversation.is_desirable:
        why = "an answer labelled undesirable (label false) is not an SFT target; train with train.objective=kto"
        return Finding("objective-mismatch", "error", source.file, source.line, why, "label")
    return None


def _texts(conversation: Conversation) -> list[str]:
    head = [conversation.system] if conversation.system is not None else []
    return head + [m.content for m in conversation.messages]


def _text_field(conversation: Conversation, index: int) -> str:
    if conversation.system is not None:
        if index == 0:
            return "system"
        index -= 1
    return f"messages[{index}].content"


def _joined_text(conversation: Conversation) -> str:
    return "\n".join(_texts(conversation))


def _exact_key(conversation: Conversation) -> str:
    canonical = [conversation.system] + [[m.role, m.content.strip()] for m in conversation.messages]
    canonical += [conversation.rejected, conversation.label]
    return hashlib.sha1(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()


def _length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    histogram: Counter = Counter()
    for length in ordered:
        bucket = 16
        while bucket < length:
            bucket *= 2
        histogram[f"<={bucket}"] += 1
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "histogram": dict(histogram),
    }
