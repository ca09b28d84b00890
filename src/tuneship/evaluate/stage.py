"""The eval stage: held-out loss, generation checks on base vs adapter, report, gates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.errors import GateFailed
from tuneship.evaluate.checks import AnswerCheck, check_answer
from tuneship.evaluate.report import add_model, load_report, write_report
from tuneship.run import Run, file_fingerprint, fingerprint

if TYPE_CHECKING:
    from rich.console import Console

    from tuneship.chat.format import ChatFormat
    from tuneship.chat.generation import Answer
    from tuneship.config import Config, EvalSection, Objective
    from tuneship.data.conversation import Conversation
    from tuneship.evaluate.prompts import EvalPrompt

LOSS_BATCH = 8


@dataclass
class EvalResult:
    report_path: Path
    summaries: dict[str, dict]
    eval_loss: float | None

    @property
    def detail(self) -> str:
        if "adapter" not in self.summaries:
            return f"eval.generate false: the exported files answer in llama.cpp; {self.report_path}"
        adapter = self.summaries["adapter"]
        exact = f", exact {adapter['exact_match']:.0%}" if "exact_match" in adapter else ""
        return f"adapter: stop {adapter['stop_rate']:.0%}{exact}; gates met; {self.report_path}"


def eval_inputs(cfg: Config, run: Run) -> str:
    """The trained adapter (its train inputs), the eval settings and the prompt sources."""
    return fingerprint(
        run.recorded_inputs("train"),
        cfg.eval.model_dump(mode="json"),
        file_fingerprint(run.data_dir / "eval.jsonl"),
        file_fingerprint(Path(cfg.eval.prompts)) if cfg.eval.prompts else None,
    )


def check_all(answers: list[Answer], prompts: list[EvalPrompt], chat_format: ChatFormat) -> list[AnswerCheck]:
    markers = chat_format.special_tokens()
    return [
        check_answer(a.text, a.stopped, p.expected, markers, p.origin, a.new_tokens) for a, p in zip(answers, prompts)
    ]


def gate_failures(name: str, summary: dict, gates: EvalSection, objective: Objective) -> list[str]:
    """Every gate the model's answers do not meet, worded with the value and the setting."""
    checks = [
        ("stop rate", summary["stop_rate"], ">=", gates.min_stop_rate, "eval.min_stop_rate"),
        ("non-empty rate", summary["non_empty_rate"], ">=", gates.min_non_empty_rate, "eval.min_non_empty_rate"),
        ("loop rate", summary["loop_rate"], "<=", gates.max_loop_rate, "eval.max_loop_rate"),
        ("leak rate", summary["leak_rate"], "<=", gates.max_leak_rate, "eval.max_leak_rate"),
        ("exact match", summary.get("exact_match", 0.0), ">=", gates.min_exact_match, "eval.min_exact_match"),
        ("recall", summary.get("recall"), ">=", gates.recall_gate(objective), "eval.min_recall"),
        ("recall F1", summary.get("recall_f1"), ">=", gates.min_recall_f1, "eval.min_recall_f1"),
    ]
    failures = []
    for what, value, direction, limit, setting in checks:
        if limit is None or value is None:  # a gate that is off, or a recall without taught prompts
            continue
        if (value < limit) if direction == ">=" else (value > limit):
            broken = "<" if direction == ">=" else ">"
            failures.append(f"{name}: {what} {value:.2f} {broken} {setting} {limit}")
    return failures


def require_gates(summaries: dict[str, dict], cfg: Config, more_failures: list[str] | None = None) -> None:
    """Raise GateFailed (exit 4) naming every unmet gate of every model given, and `more_failures` (export's)."""
    objective = cfg.train.objective
    failures = [
        failure for name, summary in summaries.items() for failure in gate_failures(name, summary, cfg.eval, objective)
    ]
    failures += more_failures or []
    if failures:
        raise GateFailed(failures)


def held_out_loss(model, chat_format: ChatFormat, conversations: list[Conversation]) -> tuple[float, int]:
    """Token-weighted mean loss over the supervised tokens, batch by batch (no logits kept)."""
    import torch

    from tuneship.train.batches import PadCollator

    collate = PadCollator(chat_format.spec.pad_token_id)
    rendered = [chat_format.render(c) for c in conversations]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rendered), LOSS_BATCH):
            batch = collate(
                [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered[start : start + LOSS_BATCH]]
            )
            batch = {k: v.to(model.device) for k, v in batch.items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
    return total / max(tokens, 1), tokens


def generation_precision(cfg: Config) -> dict:
    """load_adapted's arguments: bf16 weights, adapter included, where training ran in bf16 on this CPU (bf16
    measured fast here; autocast computed the training forward in bf16), else the checkpoint's dtype. The
    adapter is evaluated as training computed it, and a CPU generates about 1.5x faster (the quickstart's
    base answers: 11.2 -> 6.7 s on 2 cores)."""
    import torch

    from tuneship.train.device import detect_device

    device = detect_device(cfg.train.device, cfg.train.precision)
    if device.kind == "cpu" and device.precision == "bf16":
        return {"dtype": torch.bfloat16, "adapter_in_base_dtype": True}
    return {}


def run_eval(cfg: Config, run: Run, console: Console) -> EvalResult:
    """Answers of the base and of the adapter on the prompt set, into reports/eval.json and eval.md; the
    adapter's answers must meet the gates (GateFailed, exit 4, after the report is written)."""
    from tuneship.data.conversation import read_conversations
    from tuneship.evaluate.backends import hf_answers
    from tuneship.evaluate.prompts import build_prompt_set
    from tuneship.models import load_adapted
    from tuneship.report import print_eval

    with run.recording("eval", eval_inputs(cfg, run)) as outputs:
        prompts = build_prompt_set(run.data_dir, cfg.eval)
        report = load_report(run.eval_report, prompts)
        eval_split = run.data_dir / "eval.jsonl"
        eval_set = [c for c in read_conversations(eval_split) if c.is_desirable] if eval_split.is_file() else []
        eval_loss, summaries = None, {}
        if eval_set or cfg.eval.generate:
            model, chat_format = load_adapted(run, **generation_precision(cfg))
        if eval_set:
            eval_loss, tokens = held_out_loss(model, chat_format, eval_set)
            report.update(eval_loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)), eval_tokens=tokens)
        if cfg.eval.generate:
            console.print(f"generating {len(prompts)} answers with the base model and with the adapter ...")
            with model.disable_adapter():
                base = hf_answers(model, chat_format, prompts, cfg.eval.max_new_tokens)
            tuned = hf_answers(model, chat_format, prompts, cfg.eval.max_new_tokens)
            summaries = {
                "base": add_model(report, "base", check_all(base, prompts, chat_format)),
                "adapter": add_model(report, "adapter", check_all(tuned, prompts, chat_format)),
            }
        write_report(run.eval_report, report)
        outputs.update(report=str(run.eval_report), eval_loss=eval_loss)
        if summaries:
            print_eval(console, summaries, run.eval_report)
            require_gates({"adapter": summaries["adapter"]}, cfg)
    return EvalResult(run.eval_report, summaries, eval_loss)
