"""What each quantization costs SmolLM2: KL divergence and top-1 agreement against the f16 GGUF, and file size.

Usage: python benchmarks/quant_faithfulness.py [RUN_DIR] [--quants Q4_K_M,Q5_K_M,Q8_0]
Without RUN_DIR: the embedded SmolLM2-135M-Instruct, on the quickstart's eval prompts (its 30 facts, which
`eval.train_prompts: 30` checks), rendered with the quickstart's chat settings. With RUN_DIR (a trained run,
e.g. runs/quickstart): its merged model (merged first when missing) and its own eval prompts.
Measured as `tuneship export` does (tuneship/export/faithfulness.py), in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tuneship.export.faithfulness import greedy_sequences, measure_quants
from tuneship.export.gguf import QUANT_FTYPES, convert_to_gguf, quantize

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def embedded_model_inputs():
    """(model folder, ChatFormat, prompts, max_new_tokens) for SmolLM2 on the quickstart's facts."""
    from tuneship.base_model import resolve_base_model
    from tuneship.chat.format import ChatFormat
    from tuneship.config import load_config
    from tuneship.data.conversation import SourceRef
    from tuneship.data.formats import to_conversation
    from tuneship.data.sources import read_file
    from tuneship.evaluate.prompts import EvalPrompt

    cfg = load_config(QUICKSTART)
    model_dir = resolve_base_model(cfg.model.base)
    conversations = [
        to_conversation(raw.data, SourceRef(raw.file, raw.line))
        for source in cfg.data.sources
        for raw in read_file(Path(source))
    ][: cfg.eval.train_prompts]
    prompts = [EvalPrompt(f"train:{c.source.line}", "train", c, c.messages[-1].content) for c in conversations]
    return Path(model_dir), ChatFormat.from_model_dir(model_dir, cfg.chat), prompts, cfg.eval.max_new_tokens


def run_inputs(run_dir: Path):
    """(merged folder, ChatFormat, prompts, max_new_tokens) of a trained run."""
    from tuneship.chat.format import ChatFormat
    from tuneship.config import load_config
    from tuneship.evaluate.prompts import build_prompt_set
    from tuneship.export.merge import merge_adapter

    cfg = load_config(run_dir / "config.yaml")
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        merged = merge_adapter(run_dir, was_qlora=cfg.lora.qlora, console=Console(stderr=True))
    prompts = build_prompt_set(run_dir, cfg.eval)
    return merged, ChatFormat.load(run_dir / "adapter"), prompts, cfg.eval.max_new_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--quants", default="Q4_K_M,Q5_K_M,Q8_0")
    args = parser.parse_args()
    quants = args.quants.split(",")
    unknown = sorted(set(quants) - set(QUANT_FTYPES))
    if unknown:
        parser.error(f"unknown quants {unknown}; choose from {sorted(QUANT_FTYPES)}")
    model_dir, chat_format, prompts, max_new_tokens = (
        run_inputs(args.run_dir) if args.run_dir else embedded_model_inputs()
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = [("f16", convert_to_gguf(model_dir, Path(tmp) / "model-f16.gguf", "f16"))]
        files += [(q, quantize(files[0][1], Path(tmp) / f"model-{q}.gguf", q)) for q in quants]
        sizes = {kind: path.stat().st_size / 1e6 for kind, path in files}
        started = time.perf_counter()
        measured = measure_quants(files, greedy_sequences(files[0][1], chat_format, prompts, max_new_tokens))
        seconds = time.perf_counter() - started
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}")
    print(f"model: {model_dir}; {len(prompts)} prompts, greedy f16 answers up to {max_new_tokens} tokens")
    print(f"measured in {seconds:.1f} s: f16 greedy answers, then f16 and every quant scored on them")
    print(f"{'file':<8} {'MB':>7} {'KL vs f16':>10} {'top-1 agree':>12} {'positions':>10}")
    print(f"{'f16':<8} {sizes['f16']:>7.1f} {'-':>10} {'-':>12} {'-':>10}")
    for quant, figures in measured.items():
        print(
            f"{quant:<8} {sizes[quant]:>7.1f} {figures.kl_divergence:>10.5f} {figures.top1_agreement:>12.3f} "
            f"{figures.positions:>10}"
        )


if __name__ == "__main__":
    main()
