"""Read records from local files (JSON, JSONL, CSV, Parquet, transcripts) and S3-compatible buckets.

Reading is streamed record by record, and every record remembers its file and line, so that every
finding later can say where it is. A line that cannot be read is not skipped: it comes out as a
`RawRecord` with an error, and the audit counts and writes it like any other dropped record.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tuneship.data import s3
from tuneship.data.findings import Finding, RecordError
from tuneship.data.formats import MARKER_ROLES, NO_SPEAKER, TRANSCRIPT_MARKER, marker_label
from tuneship.data.s3 import DATA_SUFFIXES
from tuneship.errors import SourceError
from tuneship.extras import import_extra

MOJIBAKE_MARKERS = ("Ã©", "Ã¨", "Ã¢", "â€™", "â€œ", "â€\x9d", "Ã¶", "Ã¼", "Ã¤")
TRANSCRIPT_SUFFIXES = (".txt", ".md")
SEPARATOR_LINE = re.compile(r"^[ \t]*(-{3,}|\*{3,}|={3,})[ \t]*$")
SNIFF_BYTES = 65536
TranscriptRule = Literal["auto", "conversations", "pairs"]


@dataclass
class RawRecord:
    file: str
    line: int
    data: Any = None
    error: RecordError | None = None
    raw_text: str | None = None


def expand_sources(sources: list[str], mirror: s3.S3Mirror | None = None) -> list[str]:
    """Paths, folders, globs and s3:// keys or prefixes -> the list of data files to read."""
    files: list[str] = []
    for source in sources:
        if source.startswith("s3://"):
            files.extend((mirror or s3.S3Mirror()).expand(source))
        elif any(ch in source for ch in "*?["):
            matches = sorted(p for p in glob.glob(source, recursive=True) if _is_data_file(Path(p)))
            if not matches:
                raise SourceError(f"{source}: the pattern matches no {KNOWN_FILES}")
            files.extend(matches)
        elif os.path.isdir(source):
            found = sorted(str(p) for p in Path(source).rglob("*") if _is_data_file(p))
            if not found:
                raise SourceError(f"{source}: the folder holds no {KNOWN_FILES}")
            files.extend(found)
        elif os.path.isfile(source):
            files.append(source)
        else:
            raise SourceError(f"{source}: no such file or folder (data.sources); check the path")
    return files


KNOWN_FILES = ".jsonl/.json/.csv/.parquet file, nor a .txt/.md transcript with ### Human:/### Assistant: turns"


def _is_data_file(path: Path) -> bool:
    """Data by suffix; a .txt/.md only when it holds a speaker marker (a folder's README.md is no data)."""
    suffix = path.suffix.lower()
    if suffix in TRANSCRIPT_SUFFIXES and path.is_file():
        with open(path, "rb") as start:
            return TRANSCRIPT_MARKER.search(start.read(SNIFF_BYTES).decode("utf-8", "replace")) is not None
    return suffix in DATA_SUFFIXES


def read_records(
    files: list[str],
    mirror: s3.S3Mirror | None = None,
    transcripts: TranscriptRule = "auto",
    notes: list[Finding] | None = None,
) -> Iterator[RawRecord]:
    """The records of every file; `notes` collects file-level findings (how each transcript was split)."""
    for name in files:
        path, label = Path(name), name
        if name.startswith("s3://"):
            path = (mirror or s3.S3Mirror()).fetch(name)
        yield from read_file(path, label, transcripts, notes)


def read_file(
    path: Path, label: str | None = None, transcripts: TranscriptRule = "auto", notes: list[Finding] | None = None
) -> Iterator[RawRecord]:
    label = label or str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, label)
    elif suffix == ".json":
        yield from _read_json(path, label)
    elif suffix == ".csv":
        yield from _read_csv(path, label)
    elif suffix == ".parquet":
        yield from _read_parquet(path, label)
    elif suffix in TRANSCRIPT_SUFFIXES:
        yield from _read_transcript(path, label, transcripts, notes if notes is not None else [])
    else:
        raise SourceError(
            f"{label}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet, "
            "or a .txt/.md transcript of ### Human:/### Assistant: turns"
        )


def damaged_text(text: str) -> str | None:
    """A reason if the text carries replacement characters or classic UTF-8-as-Latin-1 mojibake."""
    if "\ufffd" in text:
        return "contains U+FFFD replacement characters (bytes that were not UTF-8)"
    marker = next((m for m in MOJIBAKE_MARKERS if m in text), None)
    if marker:
        return f"contains {marker!r}, UTF-8 text decoded as Latin-1 (mojibake)"
    return None


def _read_jsonl(path: Path, label: str) -> Iterator[RawRecord]:
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                error = RecordError(
                    "encoding",
                    f"byte {exc.start} is not UTF-8 ({raw[exc.start : exc.start + 1]!r}); re-save the file as UTF-8",
                )
                yield RawRecord(label, number, error=error, raw_text=raw.decode("utf-8", "replace"))
                continue
            try:
                yield RawRecord(label, number, data=json.loads(text.strip()), raw_text=text)
            except json.JSONDecodeError as exc:
                error = RecordError("malformed-json", f"{exc.msg} at column {exc.colno}; fix or remove this line")
                yield RawRecord(label, number, error=error, raw_text=text.rstrip("\n"))


def _decode_whole(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 become U+FFFD, which the audit flags per record."""
    return path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")


def _read_json(path: Path, label: str) -> Iterator[RawRecord]:
    """A JSON array of records (or one object), decoded element by element to keep line numbers."""
    text = _decode_whole(path)
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if index < len(text) and text[index] != "[":
        try:
            obj, _ = decoder.raw_decode(text, index)
            yield RawRecord(label, text.count("\n", 0, index) + 1, data=obj)
        except json.JSONDecodeError as exc:
            yield _json_error(label, exc, text)
        return
    index, line = index + 1, text.count("\n", 0, index) + 1
    while True:
        start = _skip_space(text, index)
        if start < len(text) and text[start] == ",":
            start = _skip_space(text, start + 1)
        if start >= len(text) or text[start] == "]":
            return
        line += text.count("\n", index, start)
        try:
            obj, index = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            yield _json_error(label, exc, text)
            return
        yield RawRecord(label, line, data=obj)
        line += text.count("\n", start, index)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _json_error(label: str, exc: json.JSONDecodeError, text: str) -> RawRecord:
    rest = text[exc.pos : exc.pos + 200]
    error = RecordError(
        "malformed-json",
        f"{exc.msg} at line {exc.lineno} column {exc.colno}; "
        "the rest of the file could not be read, fix the JSON there",
    )
    return RawRecord(label, exc.lineno, error=error, raw_text=rest)


def _read_csv(path: Path, label: str) -> Iterator[RawRecord]:
    text = _decode_whole(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:  # reading the header; line numbers count from here
        return
    line = reader.line_num + 1
    for row in reader:
        if None in row:
            error = RecordError(
                "invalid-record",
                f"{len(row[None])} more fields than the header has columns; quote fields that contain commas",
            )
            yield RawRecord(label, line, error=error, raw_text=json.dumps(row, default=str))
        else:
            yield RawRecord(label, line, data=dict(row))
        line = reader.line_num + 1


def _read_parquet(path: Path, label: str) -> Iterator[RawRecord]:
    pq = import_extra("pyarrow.parquet", f"{label}: reading Parquet")
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(label, row, data=record)


def _read_transcript(path: Path, label: str, rule: TranscriptRule, notes: list[Finding]) -> Iterator[RawRecord]:
    """One plain_text record per conversation (or pair, see `split_rule`), at the line where it starts."""
    text = _decode_whole(path)
    blocks = list(transcript_blocks(text))
    applied, note = split_rule(blocks, rule)
    if note:
        notes.append(Finding("transcript-split", "warning", label, blocks[0][0] if blocks else 0, note))
    if applied == "pairs":
        blocks = list(transcript_blocks(text, pairs=True))
    for line, block in blocks:
        if TRANSCRIPT_MARKER.search(block):
            yield RawRecord(label, line, data={"text": block}, raw_text=block)
        else:
            yield RawRecord(label, line, error=RecordError("role-order", NO_SPEAKER), raw_text=block)


def split_rule(conversations: list[tuple[int, str]], rule: TranscriptRule) -> tuple[TranscriptRule, str | None]:
    """(the rule to apply, the finding that says so). `auto` reads a file in which nothing ever ends a
    conversation (one block, several user turns: a script's dump of Q&A pairs) as pairs, and otherwise as
    conversations; either way a file whose examples could be read the other way gets a finding."""
    turns = [_user_turns(block) for _, block in conversations]
    if rule != "auto" or max(turns, default=0) < 2:
        return rule, None
    if len(conversations) == 1:
        return "pairs", (
            f"no blank line or separator ends a conversation: read as {turns[0]} examples, one per Human/Assistant "
            "pair (data.transcripts: auto); if it is one long conversation, set data.transcripts: conversations"
        )
    multi = sum(1 for count in turns if count > 1)
    return "conversations", (
        f"read as {len(conversations)} conversations ({multi} of several turns: a blank line before a user turn "
        "ends one; data.transcripts: auto); to train every Human/Assistant pair alone, set data.transcripts: pairs"
    )


def _user_turns(block: str) -> int:
    return sum(1 for m in TRANSCRIPT_MARKER.finditer(block) if MARKER_ROLES[marker_label(m)] == "user")


def transcript_blocks(text: str, pairs: bool = False) -> Iterator[tuple[int, str]]:
    """(first line, text) of each conversation in a transcript.

    A conversation ends at a separator line (`---`, `***`, `===`), or at a blank line followed by a user or
    system marker once it has an answer (text with no marker before it is a block of its own); with `pairs`,
    at every user or system marker once it has an answer, blank line or not. Turns of one conversation follow
    each other without a blank line before a user turn; blank lines inside a turn (paragraphs) stay in it.
    """
    start, lines, roles, after_blank = 0, [], set(), True
    for number, line in enumerate(text.splitlines(), start=1):
        first = TRANSCRIPT_MARKER.match(line)
        starts_conversation = first is not None and MARKER_ROLES[marker_label(first)] in ("user", "system")
        is_complete = "assistant" in roles or not roles
        if SEPARATOR_LINE.match(line) or (starts_conversation and (after_blank or pairs) and is_complete):
            if lines:
                yield start, "\n".join(lines).strip()
            lines, roles = [], set()
        after_blank = not line.strip()
        if SEPARATOR_LINE.match(line) or (after_blank and not lines):
            continue
        if not lines:
            start = number
        lines.append(line)
        roles.update(MARKER_ROLES[marker_label(m)] for m in TRANSCRIPT_MARKER.finditer(line))
    if lines:
        yield start, "\n".join(lines).strip()
