"""reports/eval.json and eval.md: one column per model (base, adapter, merged, GGUF f16, GGUF quants)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneship.evaluate.checks import AnswerCheck, summarize

COLUMN_ORDER = ["base", "adapter", "merged"]
MD_ANSWER_WIDTH = 60
# the rows of the metric table, in order (eval.md, the model card and the web page's Runs)
SUMMARY_METRICS = (
    "prompts",
    "stop_rate",
    "exact_match",
    "f1",
    "recall",
    "recall_f1",
    "non_empty_rate",
    "loops",
    "leaks",
    "prompt_token_mismatches",
)


def load_report(path: Path, prompts) -> dict:
    """The existing report (reports/eval.json) when it is about the same prompts, else a new one."""
    ids = [p.id for p in prompts]
    if path.is_file():
        report = json.loads(path.read_text(encoding="utf-8"))
        if [p["id"] for p in report.get("prompts", [])] == ids:
            return report
    return {"prompts": [p.to_json() for p in prompts], "models": {}}


def add_model(report: dict, name: str, checks: list[AnswerCheck], **extra) -> dict:
    summary = {**summarize(checks), **extra}
    report["models"][name] = {"summary": summary, "answers": [c.to_json() for c in checks]}
    return summary


def write_report(path: Path, report: dict) -> None:
    """reports/eval.json and, beside it, eval.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    path.with_suffix(".md").write_text(markdown(report), encoding="utf-8")


def ordered_models(report: dict) -> list[str]:
    names = list(report["models"])
    known = [n for n in COLUMN_ORDER if n in names]
    ggufs = sorted((n for n in names if n not in COLUMN_ORDER), key=lambda n: (n != "gguf-f16", n))
    return known + ggufs


def markdown(report: dict) -> str:
    models = ordered_models(report)
    lines = ["# Evaluation", "", *summary_markdown(report)]
    lines += _faithfulness_table(report, models)
    lines += [
        "",
        "Answers (✗ = did not stop on the stop token, ! = failed a check):",
        "",
        "| prompt | expected | " + " | ".join(models) + " |",
        "| --- | --- |" + " --- |" * len(models),
    ]
    for index, prompt in enumerate(report["prompts"]):
        answers = [_answer_cell(report["models"][m]["answers"][index]) for m in models]
        lines.append(
            f"| {_escape(prompt['question'])} | {_escape(prompt['expected'] or '')} | " + " | ".join(answers) + " |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(report: dict) -> list[str]:
    """The held-out loss and the metrics table, one column per model (eval.md and the hub model card)."""
    models = ordered_models(report)
    lines = []
    if "eval_loss" in report:
        lines += [
            f"Held-out loss {report['eval_loss']:.4f}, perplexity {report['perplexity']:.2f} "
            f"({report['eval_tokens']} supervised tokens).",
            "",
        ]
    lines += ["| metric | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for metric in SUMMARY_METRICS:
        values = [report["models"][m]["summary"].get(metric) for m in models]
        if any(v is not None for v in values):
            lines.append(f"| {metric} | " + " | ".join(_cell(v) for v in values) + " |")
    return lines


def _faithfulness_table(report: dict, models: list[str]) -> list[str]:
    """Each quant against the f16 GGUF on the f16 model's answer tokens (export/faithfulness.py)."""
    measured = [m for m in models if "kl_vs_f16" in report["models"][m]["summary"]]
    if not measured:
        return []
    lines = [
        "",
        "Quantization vs the f16 GGUF (llama.cpp logits at the positions of the f16 model's greedy answers):",
        "",
        "| quant | KL vs f16 | top-1 agree | positions |",
        "| --- | --- | --- | --- |",
    ]
    for name in measured:
        summary = report["models"][name]["summary"]
        lines.append(
            f"| {name} | {summary['kl_vs_f16']:.5f} | {summary['top1_agreement']:.3f} | {summary['kl_positions']} |"
        )
    return lines


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _answer_cell(answer: dict) -> str:
    marks = ("" if answer["stopped"] else "✗ ") + ("" if answer["passed"] or not answer["stopped"] else "! ")
    return marks + _escape(answer["answer"])


def _escape(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MD_ANSWER_WIDTH else text[: MD_ANSWER_WIDTH - 1] + "…"
