"""The export stage: merge -> GGUF f16 -> quants, each validated and checked in llama.cpp.

Every artifact answers the run's prompt set with the same ChatFormat, greedy, and becomes a column
of reports/eval.md next to the adapter: a person sees in one table whether merging, conversion or
quantization changed the answers. The gates of `eval:` hold for every artifact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tuneship.evaluate.report import add_model, load_report, write_report
from tuneship.evaluate.stage import check_all, eval_inputs, generation_precision, require_gates
from tuneship.export.faithfulness import (
    MEMORY_BUDGET_BYTES,
    Faithfulness,
    kl_gate_failures,
    measure_on_served_answers,
    measure_quants,
    scored_sequences,
)
from tuneship.run import Run, fingerprint

if TYPE_CHECKING:
    from rich.console import Console

    from tuneship.chat.format import ChatFormat
    from tuneship.config import Config
    from tuneship.evaluate.prompts import EvalPrompt

T = TypeVar("T")


@dataclass
class ExportResult:
    merged_dir: Path | None
    ggufs: list[dict]
    summaries: dict[str, dict]
    timings: dict[str, float]
    faithfulness: dict[str, Faithfulness] = field(default_factory=dict)

    @property
    def detail(self) -> str:
        files = ", ".join(Path(info["path"]).name for info in self.ggufs)
        stops = ", ".join(f"{name} stop {s['stop_rate']:.0%}" for name, s in self.summaries.items())
        return f"{files}; {stops}; gates met"


@dataclass
class ExportContext:
    """What every export step shares: the run, its format, the prompt set and the report being filled."""

    cfg: Config
    run: Run
    chat_format: ChatFormat
    prompts: list[EvalPrompt]
    report: dict
    console: Console
    timings: dict[str, float]

    def timed(self, name: str, action: Callable[[], T]) -> T:
        started = time.monotonic()
        result = action()
        self.timings[name] = round(time.monotonic() - started, 2)
        return result


def export_inputs(cfg: Config, run: Run) -> str:
    """What eval depends on (the artifacts are checked with the same prompts and gates), and `export:`."""
    return fingerprint(eval_inputs(cfg, run), cfg.export.model_dump())


def run_export(cfg: Config, run: Run, console: Console) -> ExportResult:
    """Merged model and GGUFs (or, with export.merge false, the LoRA GGUF), validated, answering the prompt set
    in their columns of reports/eval.md; every artifact must meet the gates (GateFailed, exit 4)."""
    from tuneship.evaluate.prompts import build_prompt_set
    from tuneship.models import trained_chat_format
    from tuneship.report import print_export

    with run.recording("export", export_inputs(cfg, run)) as outputs:
        prompts = build_prompt_set(run.data_dir, cfg.eval)
        context = ExportContext(
            cfg, run, trained_chat_format(run), prompts, load_report(run.eval_report, prompts), console, {}
        )
        run.gguf_dir.mkdir(parents=True, exist_ok=True)
        result = _export_merged(context) if cfg.export.merge else _export_lora(context)
        write_report(run.eval_report, context.report)
        (run.gguf_dir / "export.json").write_text(
            json.dumps({"files": result.ggufs, "timings": result.timings}, indent=2)
        )
        outputs.update(ggufs=[info["path"] for info in result.ggufs], merged=str(result.merged_dir or ""))
        print_export(console, result, run.eval_report.with_suffix(".md"))
        require_gates(result.summaries, cfg, kl_gate_failures(result.faithfulness, cfg.export.max_kl_divergence))
    return result


def _export_merged(context: ExportContext) -> ExportResult:
    from tuneship.export import gguf
    from tuneship.export.merge import merge_adapter

    cfg, run, chat_format = context.cfg, context.run, context.chat_format
    merged_dir = context.timed("merge", lambda: merge_adapter(run, was_qlora=cfg.lora.qlora, console=context.console))
    outtype = cfg.export.outtype
    started = time.monotonic()
    with gguf.start_conversion(merged_dir, run.gguf(outtype), outtype) as conversion:
        # while the converter runs in its own process; with eval.generate false nothing answers in PyTorch
        summaries = {"merged": _check_merged(context)} if cfg.eval.generate else {}
        f16 = conversion.result()
    context.timings["convert"] = round(time.monotonic() - started, 2)  # with the merged model's answers alongside
    files = [(outtype, f16)]
    for quant in cfg.export.quants:
        quantized = context.timed(f"quantize {quant}", lambda q=quant: gguf.quantize(f16, run.gguf(q), q))
        files.append((quant, quantized))
    infos = []
    reference_tensors = reference_answers = None
    for kind, path in files:
        info = gguf.validate_gguf(path, kind, chat_format, reference_tensors)
        reference_tensors = reference_tensors or info.tensor_count
        context.console.print(
            f"validated {path.name}: {info.size_bytes / 1e6:.1f} MB, {info.architecture}, "
            f"{info.tensor_count} tensors, types {info.tensor_types}"
        )
        keep = MEMORY_BUDGET_BYTES if reference_answers is None and len(files) > 1 else 0  # the reference's
        summaries[f"gguf-{kind}"], generation = _check_gguf(context, path, f"gguf-{kind}", keep_logits_bytes=keep)
        reference_answers = reference_answers or generation  # the unquantized file's, scored against each quant
        infos.append(asdict(info) | {"chat_template": None})
    measured = context.timed(
        "faithfulness",
        lambda: measure_quants(files, scored_sequences(reference_answers), reference_answers.answer_logits),
    )
    for kind, figures in measured.items():
        summaries[f"gguf-{kind}"].update(figures.to_summary())
    return ExportResult(merged_dir, infos, summaries, context.timings, measured)


def _check_merged(context: ExportContext) -> dict:
    from tuneship.evaluate.backends import hf_answers
    from tuneship.models import load_merged

    dtype = generation_precision(context.cfg).get("dtype")  # the precision eval generated the adapter's answers in
    model = load_merged(context.run, context.chat_format, **({"dtype": dtype} if dtype else {}))
    answers = hf_answers(model, context.chat_format, context.prompts, context.cfg.eval.max_new_tokens)
    return add_model(context.report, "merged", check_all(answers, context.prompts, context.chat_format))


def _check_gguf(context: ExportContext, path: Path, name: str, lora_path: Path | None = None, keep_logits_bytes=0):
    """(the GGUF's summary in the report, its GGUFGeneration)."""
    from tuneship.evaluate.backends import generate_with_gguf

    tokens = context.cfg.eval.max_new_tokens
    generation = generate_with_gguf(path, context.chat_format, context.prompts, tokens, lora_path, keep_logits_bytes)
    checks = check_all(generation.answers, context.prompts, context.chat_format)
    summary = add_model(context.report, name, checks, prompt_token_mismatches=generation.prompt_token_mismatches)
    return summary, generation


def _export_lora(context: ExportContext) -> ExportResult:
    """export.merge false: the adapter as a LoRA GGUF, checked in llama.cpp as it serves, on the base's quantized
    GGUF (the deployed quant), and measured (KL, top-1 agreement) against the same LoRA on the base's f16 GGUF,
    which scores the served answers (faithfulness.measure_on_served_answers). The base GGUFs are built once per
    base model (base_gguf.py)."""
    from tuneship.export import gguf
    from tuneship.base_gguf import REFERENCE_KIND, base_gguf
    from tuneship.models import adapter_base_dir

    run, quant = context.run, context.run.deployed_quant
    base_dir = adapter_base_dir(run)
    lora = context.timed("convert lora", lambda: gguf.convert_lora_to_gguf(run.adapter_dir, base_dir, run.lora_gguf))
    reference = context.timed(f"base {REFERENCE_KIND}", lambda: base_gguf(base_dir, REFERENCE_KIND))
    context.console.print(f"wrote {lora.name}; checking it in llama.cpp on the base model's GGUF")
    summaries, measured = {}, {}
    if quant != REFERENCE_KIND:  # the served quant's logits are kept for its KL against the f16 base
        served = context.timed(f"base {quant}", lambda: base_gguf(base_dir, quant))
        summaries[f"gguf-lora-{quant}"], generation = _check_gguf(
            context, served, f"gguf-lora-{quant}", lora, MEMORY_BUDGET_BYTES
        )
        measured[f"lora-{quant}"] = context.timed(
            "faithfulness", lambda: measure_on_served_answers(reference, served, generation, lora)
        )
        summaries[f"gguf-lora-{quant}"].update(measured[f"lora-{quant}"].to_summary())
    else:
        summaries[f"gguf-lora-{quant}"], _ = _check_gguf(context, reference, f"gguf-lora-{quant}", lora)
    info = gguf.read_gguf(lora, "lora")
    return ExportResult(None, [asdict(info) | {"chat_template": None}], summaries, context.timings, measured)
