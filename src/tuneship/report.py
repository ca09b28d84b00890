"""Summary tables printed at the end of each stage (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tuneship.data.findings import CODES

FINDINGS_SHOWN = 20


def print_audit(console: Console, result, written: dict[str, Path]) -> None:
    report = result.audit
    table = Table(title="data audit", show_lines=False)
    for column in ("code", "errors (dropped)", "warnings (kept)", "meaning"):
        table.add_column(column)
    for code, counts in report.counts.items():
        table.add_row(code, str(counts["error"]), str(counts["warning"]), CODES[code])
    if report.findings:
        console.print(table)
    sources = Table(title="sources")
    for column in ("file", "read", "kept", "dropped"):
        sources.add_column(column)
    for name, counts in report.stats["per_source"].items():
        sources.add_row(name, *(str(counts.get(k, 0)) for k in ("read", "kept", "dropped")))
    console.print(sources)
    for finding in report.findings[:FINDINGS_SHOWN]:
        colour = "red" if finding.severity == "error" else "yellow"
        console.print(f"[{colour}]{finding.severity}[/] [bold]{finding.code}[/] "
                      f"{escape(finding.location)}: {escape(finding.message)}", highlight=False)
    if len(report.findings) > FINDINGS_SHOWN:
        console.print(f"... and {len(report.findings) - FINDINGS_SHOWN} more findings (audit.json has them all)")
    if "tokens" in report.stats:
        tokens = report.stats["tokens"]
        console.print(f"tokens per example: min {tokens['min']}, median {tokens['median']}, p95 {tokens['p95']}, "
                      f"max {tokens['max']}")
    verdict = "[green]usable[/]" if result.is_usable else "[red]nothing usable[/]"
    console.print(f"{report.records_read} read = {len(report.kept)} kept + {len(report.dropped)} dropped "
                  f"(train {len(result.train)}, eval {len(result.eval)}): {verdict}")
    for name, path in written.items():
        console.print(f"  wrote {path}")
