"""What the Runs page shows, read from run directories only (no store): stages, audit, loss plot, eval table."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneship.evaluate.report import SUMMARY_METRICS, ordered_models

ABSOLUTE_PATH = re.compile(r"(?<![\w:/])/[^\s:'\"]+")  # a path of this machine inside a message
STAGE_ORDER = ("data", "train", "eval", "export", "template", "deploy")
METRIC_ORDER = (*SUMMARY_METRICS, "passed", "kl_vs_f16", "top1_agreement")
METRIC_LABELS = {
    "prompts": "prompts",
    "stop_rate": "stop rate",
    "exact_match": "exact answers",
    "f1": "F1 (all prompts)",
    "recall": "taught prompts answered right",
    "recall_f1": "F1 on the taught prompts",
    "non_empty_rate": "non-empty",
    "loops": "loops",
    "leaks": "leaks",
    "passed": "passed all checks",
    "prompt_token_mismatches": "prompt token mismatches",
    "kl_vs_f16": "KL vs f16",
    "top1_agreement": "top-1 agreement with f16",
    "kl_positions": "KL positions (tokens)",
}
PERCENT_METRICS = {"stop_rate", "exact_match", "non_empty_rate", "top1_agreement", "recall"}
# the same figure twice: the counts (loops, leaks) are shown, their rates over the prompts are not
REPEATED_METRICS = {"loop_rate", "leak_rate"}


@dataclass
class StageRow:
    name: str
    status: str
    seconds: float | None
    detail: str


@dataclass
class MetricRow:
    key: str
    label: str
    cells: list[str]


@dataclass
class AnswerCell:
    text: str
    stopped: bool
    passed: bool


@dataclass
class AnswerRow:
    question: str
    expected: str | None
    answers: list[AnswerCell]


@dataclass
class EvalTable:
    columns: list[str]
    metrics: list[MetricRow]
    answers: list[AnswerRow]
    eval_loss: float | None = None
    perplexity: float | None = None


@dataclass
class RunView:
    name: str
    path: Path
    updated: float
    stages: list[StageRow] = field(default_factory=list)
    audit: dict | None = None
    has_loss_plot: bool = False
    evaluation: EvalTable | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def shown_path(self) -> str:
        """The run folder as the page shows it: relative to the folder of runs (no path of this machine)."""
        return f"{self.path.parent.name}/{self.name}"

    @property
    def status(self) -> str:
        """The last stage's status, or 'empty' when no stage was recorded."""
        return self.stages[-1].status if self.stages else "empty"


def run_names(runs_dir: Path) -> list[str]:
    """Folders under runs_dir that hold a run (a manifest or a config), newest first."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and _marker(p) is not None]
    return [p.name for p in sorted(runs, key=lambda p: (-_marker(p).stat().st_mtime, p.name))]


def run_path(runs_dir: Path, name: str) -> Path | None:
    """The run folder called `name` directly under runs_dir, or None (also for names that climb out of it)."""
    return runs_dir / name if name in run_names(runs_dir) else None


def read_run(path: Path) -> RunView:
    """Everything the page shows about one run; a file that cannot be read becomes a problem line, not an error."""
    marker = _marker(path)
    view = RunView(path.name, path, marker.stat().st_mtime if marker else 0.0)
    manifest = _read_json(path / "manifest.json", view.problems)
    view.stages = stage_rows(manifest or {}, path.resolve())
    view.audit = _read_json(path / "data" / "audit.json", view.problems)
    for finding in (view.audit or {}).get("findings", []):
        finding["file"] = _short_file(str(finding.get("file", "")))
        finding["message"] = ABSOLUTE_PATH.sub(lambda m: _short_file(m.group()), str(finding.get("message", "")))
    view.has_loss_plot = (path / "reports" / "loss.png").is_file()
    report = _read_json(path / "reports" / "eval.json", view.problems)
    view.evaluation = eval_table(report) if report and report.get("models") else None
    return view


def stage_rows(manifest: dict[str, Any], run_dir: Path) -> list[StageRow]:
    known = [s for s in STAGE_ORDER if s in manifest]
    others = [s for s in manifest if s not in STAGE_ORDER]
    return [_stage_row(name, manifest[name], run_dir) for name in known + others]


def _stage_row(name: str, entry: dict[str, Any], run_dir: Path) -> StageRow:
    outputs = entry.get("outputs") or {}
    parts = (_output_text(k, v, run_dir) for k, v in outputs.items() if v not in (None, [], {}, ""))
    detail = _value_text(outputs["detail"], run_dir) if outputs.get("detail") else "; ".join(parts)
    return StageRow(name, str(entry.get("status", "unknown")), entry.get("seconds"), str(detail))


def _output_text(name: str, value: Any, run_dir: Path) -> str:
    """One output as words: a file named as its key (data/train.jsonl under "train.jsonl") by its name only,
    paths relative to the run folder, numbers rounded, lists joined."""
    label = name.replace("_", " ")
    if isinstance(value, list):
        shown = ", ".join(_value_text(v, run_dir) for v in value)
        return f"{label}: {shown}"
    if Path(str(value)).name == name:
        return name
    return f"{label}: {_value_text(value, run_dir)}"


def _short_file(file: str) -> str:
    """A data file as the page shows it: its folder and name (an s3:// URI whole), no path of this machine."""
    if "://" in file or not file.startswith("/"):
        return file
    path = Path(file)
    return f"{path.parent.name}/{path.name}"


def _value_text(value: Any, run_dir: Path) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if text.startswith("/") and "\n" not in text and " " not in text:
        path = Path(text)
        return path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else path.name
    return text.replace(f"{run_dir.parent}/", f"{run_dir.parent.name}/")  # paths inside a message too


def eval_table(report: dict[str, Any]) -> EvalTable:
    """One column per model of eval.json; every numeric summary value a row (KL, top-1 agreement included)."""
    columns = ordered_models(report)
    summaries = [report["models"][c].get("summary", {}) for c in columns]
    keys = [k for k in METRIC_ORDER if any(k in s for s in summaries)]
    keys += sorted({k for s in summaries for k, v in s.items() if _is_number(v) and k not in keys})
    keys = [k for k in keys if k not in REPEATED_METRICS]
    metrics = [MetricRow(k, metric_label(k), [format_metric(k, s.get(k)) for s in summaries]) for k in keys]
    answers = [
        AnswerRow(
            prompt.get("question", ""),
            prompt.get("expected"),
            [_answer_cell(report["models"][c].get("answers", []), index) for c in columns],
        )
        for index, prompt in enumerate(report.get("prompts", []))
    ]
    return EvalTable(columns, metrics, answers, report.get("eval_loss"), report.get("perplexity"))


def metric_label(key: str) -> str:
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    return key.replace("_", " ").replace("kl ", "KL ").replace("top1", "top-1")


def format_metric(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if key in PERCENT_METRICS:
        return f"{value:.0%}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _answer_cell(answers: list[dict], index: int) -> AnswerCell:
    if index >= len(answers):
        return AnswerCell("(no answer)", False, False)
    answer = answers[index]
    return AnswerCell(str(answer.get("answer", "")), bool(answer.get("stopped")), bool(answer.get("passed")))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _marker(path: Path) -> Path | None:
    for name in ("manifest.json", "config.yaml"):
        if (path / name).is_file():
            return path / name
    return None


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} could not be read ({exc}); rerun the stage that writes it")
        return None
