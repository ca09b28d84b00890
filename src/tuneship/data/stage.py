"""The data stage: sources -> audit -> split -> files in the run's data/ folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneship.data.audit import AuditResult, AuditSettings, audit
from tuneship.data.conversation import Conversation, write_jsonl
from tuneship.data.findings import CODES
from tuneship.data.s3 import S3Mirror
from tuneship.data.sources import expand_sources, read_records
from tuneship.data.split import split
from tuneship.errors import DataError

MARKDOWN_FINDINGS_LIMIT = 200


@dataclass
class DataResult:
    audit: AuditResult
    train: list[Conversation]
    eval: list[Conversation]
    files: list[str]

    @property
    def is_usable(self) -> bool:
        return len(self.train) > 0


def prepare_data(
    sources: list[str], settings: AuditSettings, *, eval_ratio: float = 0.0, seed: int = 42, s3_settings=None
) -> DataResult:
    if not sources:
        raise DataError("no data sources: set data.sources in the config or pass files to `tuneship data check`")
    mirror = S3Mirror(s3_settings)
    files = expand_sources(sources, mirror)
    result = audit(read_records(files, mirror), settings)
    result.findings[:0] = mirror.findings  # s3:// sources read from the local mirror because offline
    train, evaluation = split(result.kept, result.groups, eval_ratio, seed)
    return DataResult(result, train, evaluation, files)


def write_data_outputs(result: DataResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("train.jsonl", "eval.jsonl", "dropped.jsonl", "audit.json", "audit.md")}
    write_jsonl(paths["train.jsonl"], (c.to_json() for c in result.train))
    write_jsonl(paths["eval.jsonl"], (c.to_json() for c in result.eval))
    write_jsonl(paths["dropped.jsonl"], result.audit.dropped)
    paths["audit.json"].write_text(json.dumps(audit_json(result), indent=2, ensure_ascii=False), encoding="utf-8")
    paths["audit.md"].write_text(audit_markdown(result), encoding="utf-8")
    return paths


def audit_json(result: DataResult) -> dict:
    report = result.audit
    return {
        "totals": {
            "records_read": report.records_read,
            "kept": len(report.kept),
            "dropped": len(report.dropped),
            "train": len(result.train),
            "eval": len(result.eval),
            "errors": report.errors,
            "warnings": report.warnings,
        },
        "counts": report.counts,
        "stats": report.stats,
        "files": result.files,
        "findings": [f.to_json() for f in report.findings],
    }


def audit_markdown(result: DataResult) -> str:
    report = result.audit
    lines = [
        "# Data audit",
        "",
        f"Read **{report.records_read}** records from {len(result.files)} file(s): "
        f"kept **{len(report.kept)}** (train {len(result.train)}, eval {len(result.eval)}), "
        f"dropped **{len(report.dropped)}** (see dropped.jsonl).",
        "",
        "| code | errors (dropped) | warnings (kept) | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for code, counts in report.counts.items():
        lines.append(f"| `{code}` | {counts['error']} | {counts['warning']} | {CODES[code]} |")
    lines += ["", "| source | read | kept | dropped |", "| --- | --- | --- | --- |"]
    for name, counts in report.stats["per_source"].items():
        lines.append(f"| {name} | {counts.get('read', 0)} | {counts.get('kept', 0)} | {counts.get('dropped', 0)} |")
    lines += ["", "## Findings", ""]
    for finding in report.findings[:MARKDOWN_FINDINGS_LIMIT]:
        lines.append(f"- **{finding.severity}** `{finding.code}` {finding.location}: {finding.message}")
    if len(report.findings) > MARKDOWN_FINDINGS_LIMIT:
        lines.append(f"- ... {len(report.findings) - MARKDOWN_FINDINGS_LIMIT} more in audit.json")
    return "\n".join(lines) + "\n"
