"""Training throughput: tuneship's trainer vs a plain TRL SFTTrainer, same model, data and steps.

Usage: python benchmarks/train_throughput.py [--steps 20]
Each trainer runs in its own subprocess (so peak RSS is its own). TRL runs with its defaults,
except bf16=False / use_cpu on a CPU-only machine (its default bf16 fails there) and the same
batch size, learning rate, LoRA and step count as ours. Printed: non-pad tokens/s, supervised
tokens/s (the tokens that carry loss), seconds, peak RSS, and the ratio ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
BATCH, LEARNING_RATE, LORA_R, LORA_ALPHA = 8, 1e-3, 16, 32


def run_ours(steps: int, workdir: Path) -> dict:
    from rich.console import Console

    from tuneship.config import load_config
    from tuneship.run import Run
    from tuneship.train.stage import run_train

    cfg = load_config(
        QUICKSTART,
        [
            f"run.dir={workdir}",
            f"train.max_steps={steps}",
            "train.save_steps=100000",
            "train.report_to=[]",
            f"train.batch_size={BATCH}",
            f"train.learning_rate={LEARNING_RATE}",
        ],
    )
    result = run_train(cfg, Run.create(cfg), Console(file=open("/dev/null", "w")), fresh=True)
    return {
        "seconds": result.seconds,
        "tokens": result.tokens_per_second * result.seconds,
        "supervised": result.supervised_tokens_per_second * result.seconds,
    }


def run_trl(steps: int, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneship.base_model import resolve_base_model
    from tuneship.config import load_config

    cfg = load_config(QUICKSTART)
    rows = [json.loads(line) for line in open(cfg.data.sources[0], encoding="utf-8")]
    model_dir = resolve_base_model(cfg.model.base)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=10,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    counts = {"tokens": 0, "supervised": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts["tokens"] += (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        )
        counts["supervised"] += int((batch["labels"] != -100).sum())
        return batch

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - started, **counts}


def child(which: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_ours if which == "ours" else run_trl)(steps, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(which: str, steps: int) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", which, "--steps", str(steps)], capture_output=True, text=True, check=False
    )
    line = next((row for row in output.stdout.splitlines() if row.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{which} failed:\n{output.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=["ours", "trl"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    results = {which: measure(which, args.steps) for which in ("ours", "trl")}
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}; "
        f"SmolLM2-135M-Instruct, LoRA r={LORA_R}, batch {BATCH}, {args.steps} steps, fp32 CPU"
    )
    print(f"{'trainer':<10}{'seconds':>10}{'tok/s':>10}{'sup tok/s':>12}{'supervised':>12}{'peak RSS MB':>13}")
    for which, r in results.items():
        print(
            f"{which:<10}{r['seconds']:>10.1f}{r['tokens'] / r['seconds']:>10.0f}"
            f"{r['supervised'] / r['seconds']:>12.0f}{r['supervised']:>12.0f}{r['peak_rss_mb']:>13.0f}"
        )
    ours, trl = results["ours"], results["trl"]
    print(
        f"ratio ours/TRL: non-pad tokens/s {ours['tokens'] / ours['seconds'] / (trl['tokens'] / trl['seconds']):.2f}, "
        f"wall time {ours['seconds'] / trl['seconds']:.2f}"
    )
    print(
        "note: TRL's defaults put loss on every token (prompt and system prompt too); "
        "tuneship supervises only answers + stop token"
    )


if __name__ == "__main__":
    main()
