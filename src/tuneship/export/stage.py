"""The export stage: merge -> GGUF f16 -> quants, each validated and checked in llama.cpp.

Every artifact answers the run's prompt set with the same ChatFormat, greedy, and becomes a column
of reports/eval.md next to the adapter: a person sees in one table whether merging, conversion or
quantization changed the answers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuneship.evaluate.report import add_model, load_report, write_report
from tuneship.evaluate.stage import check_all, gate_failures
from tuneship.export.faithfulness import Faithfulness, kl_gate_failures, measure_quants


@dataclass
class ExportResult:
    merged_dir: str | None
    ggufs: list[dict]
    summaries: dict[str, dict]
    timings: dict[str, float]
    gate_failures: list[str] = field(default_factory=list)
    faithfulness: dict[str, Faithfulness] = field(default_factory=dict)


def gguf_name(run_name: str, kind: str) -> str:
    return f"{run_name}-{kind}.gguf"


def run_export(cfg, run_path: Path, console, *, merge: bool = True) -> ExportResult:
    from tuneship.chat.format import ChatFormat
    from tuneship.evaluate.prompts import build_prompt_set
    from tuneship.export import gguf

    chat_format = ChatFormat.load(run_path / "adapter")
    prompts = build_prompt_set(run_path, cfg.eval)
    reports = run_path / "reports"
    report = load_report(reports, prompts)
    timings: dict[str, float] = {}
    summaries: dict[str, dict] = {}
    out = run_path / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    if not merge:
        return _export_lora_only(cfg, run_path, chat_format, prompts, report, console)
    merged_dir = _timed(timings, "merge", lambda: _merge(run_path, cfg, console))
    summaries["merged"] = _check_merged(merged_dir, chat_format, prompts, report, cfg)
    f16_kind = cfg.export.outtype
    f16 = _timed(
        timings, "convert", lambda: gguf.convert_to_gguf(merged_dir, out / gguf_name(cfg.run.name, f16_kind), f16_kind)
    )
    files = [(f16_kind, f16)]
    for quant in cfg.export.quants:
        target = out / gguf_name(cfg.run.name, quant)
        files.append((quant, _timed(timings, f"quantize {quant}", lambda t=target, q=quant: gguf.quantize(f16, t, q))))
    infos = []
    reference_tensors = None
    for kind, path in files:
        info = gguf.validate_gguf(path, kind, chat_format, reference_tensors)
        reference_tensors = reference_tensors or info.tensor_count
        console.print(
            f"validated {path.name}: {info.size_bytes / 1e6:.1f} MB, {info.architecture}, "
            f"{info.tensor_count} tensors, types {info.tensor_types}"
        )
        summaries[f"gguf-{kind}"] = _check_gguf(path, f"gguf-{kind}", chat_format, prompts, report, cfg)
        infos.append(asdict(info) | {"chat_template": None})
    measured = _timed(
        timings, "faithfulness", lambda: measure_quants(files, chat_format, prompts, cfg.eval.max_new_tokens)
    )
    for kind, figures in measured.items():
        summaries[f"gguf-{kind}"].update(figures.to_summary())
    write_report(reports, report)
    (run_path / "gguf" / "export.json").write_text(json.dumps({"files": infos, "timings": timings}, indent=2))
    failures = [f for name, s in summaries.items() for f in gate_failures(name, s, cfg.eval)]
    failures += kl_gate_failures(measured, cfg.export.max_kl_divergence)
    return ExportResult(str(merged_dir), infos, summaries, timings, failures, measured)


def _timed(timings: dict, name: str, action):
    started = time.monotonic()
    result = action()
    timings[name] = round(time.monotonic() - started, 2)
    return result


def _merge(run_path: Path, cfg, console) -> Path:
    from tuneship.export.merge import merge_adapter

    return merge_adapter(run_path, was_qlora=cfg.lora.qlora, console=console)


def _check_merged(merged_dir: Path, chat_format, prompts, report, cfg) -> dict:
    from transformers import AutoModelForCausalLM

    from tuneship.evaluate.backends import hf_answers

    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    answers = hf_answers(model, chat_format, prompts, cfg.eval.max_new_tokens)
    return add_model(report, "merged", check_all(answers, prompts, chat_format))


def _check_gguf(path: Path, name: str, chat_format, prompts, report, cfg, lora_path: Path | None = None) -> dict:
    from tuneship.evaluate.backends import gguf_answers

    answers, mismatches = gguf_answers(
        path,
        chat_format,
        prompts,
        cfg.eval.max_new_tokens,
        n_ctx=max(cfg.train.max_seq_len + cfg.eval.max_new_tokens, 512),
        lora_path=lora_path,
    )
    return add_model(report, name, check_all(answers, prompts, chat_format), prompt_token_mismatches=mismatches)


def _export_lora_only(cfg, run_path: Path, chat_format, prompts, report, console) -> ExportResult:
    """--no-merge: the adapter as a LoRA GGUF, checked in llama.cpp on an f16 GGUF of the base."""
    from tuneship.base_model import resolve_base_model
    from tuneship.export import gguf

    timings: dict[str, float] = {}
    out = run_path / "gguf"
    base_dir = resolve_base_model(cfg.model.base)
    lora = _timed(
        timings,
        "convert lora",
        lambda: gguf.convert_lora_to_gguf(run_path / "adapter", base_dir, out / gguf_name(cfg.run.name, "lora-f16")),
    )
    base_gguf = out / gguf_name("base", "f16")
    if not base_gguf.is_file():
        _timed(timings, "convert base", lambda: gguf.convert_to_gguf(Path(base_dir), base_gguf, "f16"))
    console.print(f"wrote {lora.name}; checking it in llama.cpp on {base_gguf.name}")
    summary = _check_gguf(base_gguf, "gguf-lora", chat_format, prompts, report, cfg, lora_path=lora)
    write_report(run_path / "reports", report)
    info = gguf.read_gguf(lora, "lora")
    return ExportResult(
        None,
        [asdict(info) | {"chat_template": None}],
        {"gguf-lora": summary},
        timings,
        gate_failures("gguf-lora", summary, cfg.eval),
    )
