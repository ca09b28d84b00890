"""The model card pushed with a run: base model, data, evaluation of every artifact, how to run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.evaluate.report import summary_markdown

if TYPE_CHECKING:
    from tuneship.config import Config
    from tuneship.run import Run


def model_card(run: Run, cfg: Config) -> str:
    audit = _read_json(run.data_dir / "audit.json")
    report = _read_json(run.eval_report)
    ggufs = [p.name for p in run.model_ggufs()]
    lines = [
        "---",
        f"base_model: {cfg.model.base}",
        "tags:",
        "- gguf",
        "- lora",
        "- tuneship",
        "---",
        "",
        f"# {cfg.run.name}",
        "",
        f"A LoRA fine-tune of `{cfg.model.base}`, made with tuneship.",
        "",
    ]
    if audit:
        totals = audit["totals"]
        lines += [
            "## Data",
            "",
            f"{totals['records_read']} records read, {totals['kept']} kept "
            f"({totals['train']} train, {totals['eval']} eval), {totals['dropped']} dropped by the audit.",
            "",
        ]
    if report:
        lines += ["## Evaluation (same prompts, greedy, for every artifact)", "", *summary_markdown(report), ""]
    lines += (
        ["## Files", ""]
        + [f"- `{name}`" for name in ggufs]
        + [
            "- `Modelfile`: `ollama create NAME -f Modelfile`",
            "- merged safetensors + tokenizer files (with the chat template used in training)",
            "",
            "## Run",
            "",
            "```bash",
            f"llama-server -m {ggufs[0] if ggufs else 'MODEL.gguf'} --jinja",
            "```",
            "",
        ]
    )
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
