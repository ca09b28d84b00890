"""The model card pushed with a run: base model, data, evaluation of every artifact, how to run it."""

from __future__ import annotations

import json
from pathlib import Path


def model_card(run_path: Path, cfg) -> str:
    audit = _read_json(run_path / "data" / "audit.json")
    report_md = run_path / "reports" / "eval.md"
    ggufs = sorted(p.name for p in (run_path / "gguf").glob(f"{cfg.run.name}-*.gguf"))
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
    if report_md.is_file():
        summary = report_md.read_text(encoding="utf-8").split("\n\nAnswers")[0].removeprefix("# Evaluation\n\n")
        lines += ["## Evaluation (same prompts, greedy, for every artifact)", "", summary, ""]
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
