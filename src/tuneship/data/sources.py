"""Read records from local files (JSON, JSONL, CSV, Parquet) and S3-compatible buckets.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship.data.findings import RecordError
from tuneship.data import s3
from tuneship.data.s3 import DATA_SUFFIXES
from tuneship.errors import SourceError

MOJIBAKE_MARKERS = ("Ã©", "Ã¨", "Ã¢", "â€™", "â€œ", "â€\x9d", "Ã¶", "Ã¼", "Ã¤")


@dataclass
class RawRecord:
    file: str
    line: int
    data: Any = None
    error: RecordError | None = None
    raw_text: str | None = None


def expand_sources(sources: list[str], s3_settings=None) -> list[str]:
    """Paths, folders, globs and s3:// keys or prefixes -> the list of data files to read."""
    files: list[str] = []
    for source in sources:
        if source.startswith("s3://"):
            files.extend(s3.expand(source, s3_settings))
        elif any(ch in source for ch in "*?["):
            matches = sorted(p for p in glob.glob(source, recursive=True) if p.endswith(DATA_SUFFIXES))
            if not matches:
                raise SourceError(f"{source}: the pattern matches no .jsonl/.json/.csv/.parquet file")
            files.extend(matches)
        elif os.path.isdir(source):
            found = sorted(str(p) for p in Path(source).rglob("*") if p.suffix.lower() in DATA_SUFFIXES)
            if not found:
                raise SourceError(f"{source}: the folder holds no .jsonl/.json/.csv/.parquet file")
            files.extend(found)
        elif os.path.isfile(source):
            files.append(source)
        else:
            raise SourceError(f"{source}: no such file or folder (data.sources); check the path")
    return files


def read_records(files: list[str], s3_settings=None) -> Iterator[RawRecord]:
    for name in files:
        path, label = Path(name), name
        if name.startswith("s3://"):
            path = s3.fetch(name, s3_settings)
        yield from read_file(path, label)


def read_file(path: Path, label: str | None = None) -> Iterator[RawRecord]:
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
    else:
        raise SourceError(f"{label}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


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
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"{label}: reading Parquet needs pyarrow; pip install 'tuneship[parquet]'") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(label, row, data=record)
