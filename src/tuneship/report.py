"""Summary tables printed at the end of each stage (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tuneship.data.findings import CODES

FINDINGS_SHOWN = 20
FINDINGS_SHOWN_IN_RUN = 5


def print_audit(console: Console, result, written: dict[str, Path]) -> None:
    report = result.audit
    if report.findings:
        console.print(_findings_table(report))
    sources = Table(title="sources")
    for column in ("file", "read", "kept", "dropped"):
        sources.add_column(column)
    for name, counts in report.stats["per_source"].items():
        sources.add_row(name, *(str(counts.get(k, 0)) for k in ("read", "kept", "dropped")))
    console.print(sources)
    _print_first_findings(console, report, FINDINGS_SHOWN, "audit.json")
    if "tokens" in report.stats:
        tokens = report.stats["tokens"]
        console.print(
            f"tokens per example: min {tokens['min']}, median {tokens['median']}, p95 {tokens['p95']}, "
            f"max {tokens['max']}"
        )
    _print_totals(console, result)
    for name, path in written.items():
        console.print(f"  wrote {path}")


def print_findings(console: Console, result, audit_md: Path) -> None:
    """What `train` and `run` show of the audit: counts per code and the first findings with file:line."""
    report = result.audit
    if report.findings:
        console.print(_findings_table(report))
        _print_first_findings(console, report, FINDINGS_SHOWN_IN_RUN, str(audit_md))
    _print_totals(console, result)


def _findings_table(report) -> Table:
    table = Table(title="data audit", show_lines=False)
    for column in ("code", "errors (dropped)", "warnings (kept)", "meaning"):
        table.add_column(column)
    for code, counts in report.counts.items():
        table.add_row(code, str(counts["error"]), str(counts["warning"]), CODES[code])
    return table


def _print_first_findings(console: Console, report, limit: int, where: str) -> None:
    for finding in report.findings[:limit]:
        colour = "red" if finding.severity == "error" else "yellow"
        console.print(
            f"[{colour}]{finding.severity}[/] [bold]{finding.code}[/] "
            f"{escape(finding.location)}: {escape(finding.message)}",
            highlight=False,
        )
    if len(report.findings) > limit:
        console.print(f"... and {len(report.findings) - limit} more findings ({escape(where)} has them all)")


def _print_totals(console: Console, result) -> None:
    report = result.audit
    verdict = "[green]usable[/]" if result.is_usable else "[red]nothing usable[/]"
    console.print(
        f"{report.records_read} read = {len(report.kept)} kept + {len(report.dropped)} dropped "
        f"(train {len(result.train)}, eval {len(result.eval)}): {verdict}"
    )


def print_format(console: Console, chat_format, conversations) -> None:
    """Rendered examples, supervised text highlighted, and the prompt used at inference."""
    from rich.text import Text

    spec = chat_format.spec
    console.print(
        f"template: [bold]{spec.family}[/]  stop token: [bold]{escape(spec.stop_token)}[/] "
        f"(ids {spec.stop_token_ids})  pad: {escape(spec.pad_token)} (id {spec.pad_token_id}"
        f"{', added' if spec.is_pad_added else ''})  loss on: {spec.loss_on}  "
        f"system prompt: {spec.system_prompt!r}",
        highlight=False,
    )
    for conversation in conversations:
        rendered = chat_format.render(conversation)
        text = Text()
        cursor = 0
        for start, end in rendered.spans:
            text.append(rendered.text[cursor:start], style="dim")
            text.append(rendered.text[start:end], style="bold green")
            cursor = end
        text.append(rendered.text[cursor:], style="dim")
        console.rule(
            f"{conversation.source}  {len(rendered.input_ids)} tokens, {rendered.supervised_count} supervised (green)"
        )
        console.print(text)
        console.print(Text("generation prompt at inference:", style="bold"))
        console.print(Text(chat_format.generation_prompt(conversation), style="cyan"))


def print_train(console: Console, result) -> None:
    table = Table(title="train")
    table.add_column("what")
    table.add_column("value")
    rows = [
        ("adapter", result.adapter_dir),
        ("resumed from", result.resumed_from or "-"),
        ("steps", str(result.steps)),
        ("final loss", f"{result.final_loss:.4f}" if result.final_loss is not None else "-"),
        ("time", f"{result.seconds:.1f} s"),
        (
            "tokens/s (non-pad, supervised)",
            f"{result.tokens_per_second:,.0f}, {result.supervised_tokens_per_second:,.0f}",
        ),
        ("device", f"{result.device} ({result.precision})"),
    ]
    for what, value in rows:
        table.add_row(what, escape(value))
    console.print(table)
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


def _summary_table(title: str, summaries: dict[str, dict]) -> Table:
    table = Table(title=title)
    table.add_column("model")
    metrics = [
        "prompts",
        "stop_rate",
        "non_empty_rate",
        "exact_match",
        "f1",
        "recall",
        "recall_f1",
        "loops",
        "leaks",
        "prompt_token_mismatches",
    ]
    for metric in metrics:
        table.add_column(metric)
    for name, summary in summaries.items():
        cells = [summary.get(m) for m in metrics]
        table.add_row(name, *("-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells))
    return table


def print_eval(console: Console, summaries: dict[str, dict], report_path: Path) -> None:
    console.print(_summary_table("eval", summaries))
    console.print(f"report: {report_path} and {report_path.with_suffix('.md')}")


def print_export(console: Console, result, report_md: Path) -> None:
    files = Table(title="export")
    for column in ("file", "MB", "KL vs f16", "top-1 agree", "tensor types"):
        files.add_column(column)
    for info in result.ggufs:
        figures = result.faithfulness.get(info["kind"])
        files.add_row(
            Path(info["path"]).name,
            f"{info['size_bytes'] / 1e6:.1f}",
            "-" if figures is None else f"{figures.kl_divergence:.5f}",
            "-" if figures is None else f"{figures.top1_agreement:.3f}",
            ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items()),
        )
    console.print(files)
    console.print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    console.print(_summary_table("answers of every artifact", result.summaries))
    console.print(f"side by side: {report_md}")


def print_contract(console: Console, result) -> None:
    console.print("renderers: " + ", ".join(result.renderers))
    console.print(f"gguf: {result.gguf.name if result.gguf else 'none exported yet'}", highlight=False)
    if result.is_equal:  # the differences are the error's message (ContractBroken)
        console.print("[green]identical[/] on every probe conversation (single/multi turn, with/without system)")


def print_pipeline(console: Console, summary) -> None:
    """The stages of `tuneship run` with what each produced; a failure's full message follows as the error."""
    table = Table(title=f"tuneship run: {summary.run_dir}")
    for column in ("stage", "status", "detail"):
        table.add_column(column)
    colours = {"done": "green", "skipped": "cyan", "failed": "red"}
    for outcome in summary.stages:
        colour = colours.get(outcome.status, "yellow")
        first_line = outcome.detail.splitlines()[0] if outcome.detail else ""
        table.add_row(outcome.stage, f"[{colour}]{outcome.status}[/]", escape(first_line))
    console.print(table)
    for outcome in summary.stages:
        if outcome.status not in colours:
            console.print(f"[yellow]{outcome.stage} {outcome.status}:[/] {escape(outcome.detail)}", highlight=False)


def print_doctor(console: Console, checks) -> None:
    table = Table(title="tuneship doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column)
    colours = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in checks:
        table.add_row(
            check.name, f"[{colours[check.status]}]{check.status}[/]", escape(check.detail), escape(check.fix)
        )
    console.print(table)


def print_hub_search(console: Console, hits) -> None:
    table = Table(title="GGUF repos")
    for column in ("repo", "downloads", "likes", "quant files (size)"):
        table.add_column(column)
    for hit in hits:
        files = ", ".join(
            f"{c.quant} {c.size / 1e9:.2f} GB" + (f" ({len(c.files)} parts)" if len(c.files) > 1 else "")
            for c in hit.choices
        )
        table.add_row(hit.repo_id, str(hit.downloads), str(hit.likes), escape(files or "-"))
    console.print(table)
