"""The data stage: sources -> audit -> split -> files in the run's data/ folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.data.audit import AuditResult, AuditSettings, Measure, audit
from tuneship.data.conversation import Conversation, write_jsonl
from tuneship.data.findings import CODES, Finding
from tuneship.data.s3 import S3Mirror
from tuneship.data.sources import expand_sources, read_records
from tuneship.data.split import split
from tuneship.errors import DataError

if TYPE_CHECKING:
    from rich.console import Console

    from tuneship.config import Config
    from tuneship.run import Run

MARKDOWN_FINDINGS_LIMIT = 200
FINDINGS_NAMED = 3


@dataclass
class DataResult:
    audit: AuditResult
    train: list[Conversation]
    eval: list[Conversation]
    files: list[str]

    @property
    def is_usable(self) -> bool:
        return len(self.train) > 0

    @property
    def detail(self) -> str:
        return (
            f"{len(self.train)} train / {len(self.eval)} eval, {len(self.audit.dropped)} dropped; "
            f"{findings_summary(self.audit)}"
        )


def findings_summary(report: AuditResult) -> str:
    """Counts per code and the first findings with file:line, on one line."""
    if not report.findings:
        return "no findings"
    counts = ", ".join(
        " ".join(f"{n} {severity}{'s' if n > 1 else ''}" for severity, n in by_severity.items() if n) + f" {code}"
        for code, by_severity in report.counts.items()
    )
    first = "; ".join(f"{f.location} {f.code}" for f in report.findings[:FINDINGS_NAMED])
    more = " ..." if len(report.findings) > FINDINGS_NAMED else ""
    return f"findings: {counts} (first: {first}{more})"


def audit_settings(cfg: Config, measure: Measure | None = None) -> AuditSettings:
    return AuditSettings(
        format=cfg.data.format,
        columns=cfg.data.columns,
        near_duplicate_similarity=cfg.data.near_duplicate_similarity,
        max_seq_len=cfg.train.max_seq_len if measure else None,
        measure=measure,
        objective=cfg.train.objective,
        transcripts=cfg.data.transcripts,
    )


def check_data(cfg: Config, measure: Measure | None = None) -> DataResult:
    """Read, audit and split `data.sources` (with the token check when `measure` is given); nothing written."""
    return prepare_data(
        cfg.data.sources,
        audit_settings(cfg, measure),
        eval_ratio=cfg.data.eval_ratio,
        seed=cfg.data.seed,
        s3_settings=cfg.data.s3,
    )


def data_inputs(cfg: Config) -> str:
    from tuneship.run import fingerprint

    return fingerprint(
        cfg.data.model_dump(mode="json"),
        cfg.model.base,
        cfg.chat.model_dump(),
        cfg.train.max_seq_len,
        cfg.train.objective,
    )


def run_data(cfg: Config, run: Run, console: Console) -> DataResult:
    """The data stage of a run: the audit with the token check of the run's ChatFormat, the split, every
    output in <run>/data/; the findings are shown; `data.strict` stops on any finding."""
    from tuneship.models import base_chat_format
    from tuneship.report import print_findings

    chat_format = base_chat_format(cfg)
    with run.recording("data", data_inputs(cfg)) as outputs:
        result = check_data(cfg, chat_format.measure)
        written = write_data_outputs(result, run.data_dir)
        outputs.update({name: str(path) for name, path in written.items()})
        print_findings(console, result, run.data_dir / "audit.md")
        require_usable(result, run.data_dir / "audit.md")
        if cfg.data.strict:
            require_clean(result, run.data_dir / "audit.md")
    return result


def require_usable(result: DataResult, audit_md: Path | None) -> None:
    if not result.is_usable:
        where = f"; see {audit_md}" if audit_md else ""
        raise DataError(f"no usable training examples: {result.audit.records_read} read, all dropped or in eval{where}")


def require_clean(result: DataResult, audit_md: Path | None) -> None:
    """data.strict: any finding, error or warning, stops the run before training."""
    if result.audit.findings:
        where = f" (all of them in {audit_md})" if audit_md else ""
        raise DataError(
            f"data.strict: the audit has {findings_summary(result.audit)}{where}; fix the data, or set "
            "data.strict=false to train on what the audit kept"
        )


def prepare_data(
    sources: list[str], settings: AuditSettings, *, eval_ratio: float = 0.0, seed: int = 42, s3_settings=None
) -> DataResult:
    if not sources:
        raise DataError("no data sources: set data.sources in the config or pass files to `tuneship data check`")
    mirror = S3Mirror(s3_settings)
    files = expand_sources(sources, mirror)
    notes: list[Finding] = []
    result = audit(read_records(files, mirror, settings.transcripts, notes), settings)
    result.findings[:0] = mirror.findings + notes  # s3:// sources read offline; how transcripts were split
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
