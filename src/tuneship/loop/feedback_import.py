"""`tuneship feedback import FILE`: feedback collected elsewhere (JSONL or CSV with generation_id, rating,
correction, comment), validated like POST /v1/feedback. Each record's idempotency key is its file and content,
so importing the same file twice counts it once; invalid records are listed with file and line, never skipped
silently."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.loop.signals import check_feedback
from tuneship.loop.store import Store, UnknownGeneration

FIELDS = {"generation_id", "rating", "correction", "comment"}


@dataclass
class ImportResult:
    imported: int = 0
    already: int = 0
    invalid: list[str] = field(default_factory=list)


def import_feedback(store: Store, path: Path) -> ImportResult:
    from tuneship.data.sources import read_file

    result = ImportResult()
    for raw in read_file(path):
        where = f"{raw.file}:{raw.line}"
        if raw.error is not None:
            result.invalid.append(f"{where}: {raw.error}")
            continue
        try:
            record = _record(raw.data)
            rating, correction = check_feedback(record.get("rating"), record.get("correction"))
            key = "import:" + hashlib.sha256(json.dumps([path.name, record], sort_keys=True).encode()).hexdigest()[:32]
            _, is_new = store.add_feedback(
                str(record.get("generation_id") or ""),
                rating,
                correction,
                record.get("comment"),
                key,
                f"import:{where}",
            )
        except (ValueError, UnknownGeneration) as exc:
            result.invalid.append(f"{where}: {exc}")
            continue
        if is_new:
            result.imported += 1
        else:
            result.already += 1
    return result


def _record(data: object) -> dict:
    if not isinstance(data, dict):
        raise ValueError("a record must be an object with generation_id, rating, correction, comment")
    unknown = set(data) - FIELDS
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown field; expected {', '.join(sorted(FIELDS))}")
    if not data.get("generation_id"):
        raise ValueError("generation_id: required")
    return {key: (None if value == "" else value) for key, value in data.items()}
