"""The eval stage: held-out loss, generation checks on base vs adapter, report, gates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tuneship.errors import TuneshipError
from tuneship.evaluate.checks import AnswerCheck, check_answer
from tuneship.evaluate.report import add_model, load_report, write_report

LOSS_BATCH = 8


class GateFailed(TuneshipError):
    """An evaluation gate (eval.min_stop_rate, eval.min_exact_match) was not met."""

    exit_code = 4


@dataclass
class EvalResult:
    report_path: Path
    summaries: dict[str, dict]
    eval_loss: float | None
    gate_failures: list[str]


def check_all(answers, prompts, chat_format) -> list[AnswerCheck]:
    markers = chat_format.special_tokens()
    return [check_answer(a.text, a.stopped, p.expected, markers) for a, p in zip(answers, prompts)]


def gate_failures(name: str, summary: dict, eval_cfg) -> list[str]:
    failures = []
    if summary["stop_rate"] < eval_cfg.min_stop_rate:
        failures.append(f"{name}: stop rate {summary['stop_rate']:.2f} < eval.min_stop_rate {eval_cfg.min_stop_rate}")
    minimum = eval_cfg.min_exact_match
    if minimum is not None and summary.get("exact_match", 0.0) < minimum:
        failures.append(f"{name}: exact match {summary.get('exact_match', 0.0):.2f} < eval.min_exact_match {minimum}")
    return failures


def held_out_loss(model, chat_format, conversations) -> tuple[float, int]:
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


def run_eval(cfg, run_path: Path, console) -> EvalResult:
    from tuneship.data.conversation import read_conversations
    from tuneship.evaluate.backends import hf_answers
    from tuneship.evaluate.models import load_adapter_model
    from tuneship.evaluate.prompts import build_prompt_set

    model, chat_format = load_adapter_model(run_path)
    prompts = build_prompt_set(run_path, cfg.eval)
    reports = run_path / "reports"
    report = load_report(reports, prompts)
    eval_set = (
        read_conversations(run_path / "data" / "eval.jsonl") if (run_path / "data" / "eval.jsonl").is_file() else []
    )
    eval_loss = None
    if eval_set:
        eval_loss, tokens = held_out_loss(model, chat_format, eval_set)
        report.update(eval_loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)), eval_tokens=tokens)
    console.print(f"generating {len(prompts)} answers with the base model and with the adapter ...")
    with model.disable_adapter():
        base = hf_answers(model, chat_format, prompts, cfg.eval.max_new_tokens)
    tuned = hf_answers(model, chat_format, prompts, cfg.eval.max_new_tokens)
    summaries = {
        "base": add_model(report, "base", check_all(base, prompts, chat_format)),
        "adapter": add_model(report, "adapter", check_all(tuned, prompts, chat_format)),
    }
    write_report(reports, report)
    return EvalResult(
        reports / "eval.json", summaries, eval_loss, gate_failures("adapter", summaries["adapter"], cfg.eval)
    )
