"""GPU training throughput: tuneship vs TRL's SFTTrainer with the same settings: bf16, Liger kernels, QLoRA.

Usage: python benchmarks/train_throughput_gpu.py --config-dir DIR [--steps 40] [--batch 16] [--rows ...]
DIR holds a model's config.json and tokenizer files (e.g. SmolLM2-135M-Instruct's); the model is built from
the config with random weights (throughput does not depend on the weights), so no checkpoint has to travel.
Data: 2,048 synthetic conversations (a question of ~20 words, an answer of ~150), the same for both trainers.
TRL runs with its defaults (loss on every token, padded batches) plus the row's bf16 / liger / 4-bit setting.
Each row runs in its own subprocess; printed: non-pad tokens/s, supervised tokens/s, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES, QUESTION_WORDS, ANSWER_WORDS, LEARNING_RATE, LORA_R, LORA_ALPHA = 2048, 20, 150, 1e-4, 16, 32
ROWS = ["TRL bf16", "ours bf16", "TRL bf16 + liger", "ours bf16 + liger", "TRL QLoRA", "ours QLoRA"]


def write_data(path: Path) -> Path:
    rng = random.Random(0)
    words = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "vo", "ri") for b in ("n", "l", "st", "ve", "")]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(EXAMPLES):
            question = " ".join(rng.choice(words) for _ in range(QUESTION_WORDS)) + f" {i}?"
            answer = " ".join(rng.choice(words) for _ in range(ANSWER_WORDS)) + "."
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def random_model(config_dir: Path, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(target)
    return target


def run_ours(row: str, model_dir: Path, data: Path, workdir: Path, steps: int, batch: int) -> dict:
    import yaml
    from rich.console import Console

    from tuneship.config import load_config
    from tuneship.run import Run
    from tuneship.train.stage import run_train

    config = {
        "run": {"name": "gpu", "dir": str(workdir)},
        "model": {"base": str(model_dir)},
        "data": {"sources": [str(data)], "eval_ratio": 0.0},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "qlora": "QLoRA" in row},
        "train": {
            "max_seq_len": 1024,
            "max_steps": steps,
            "batch_size": batch,
            "learning_rate": LEARNING_RATE,
            "save_steps": 100000,
            "report_to": [],
            "kernels": "liger" if "liger" in row else "torch",
        },
    }
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    result = run_train(cfg, Run.create(cfg), Console(file=open("/dev/null", "w")), fresh=True)
    return {
        "seconds": result.seconds,
        "tokens": result.tokens_per_second * result.seconds,
        "supervised": result.supervised_tokens_per_second * result.seconds,
        "final_loss": result.final_loss,
    }


def run_trl(row: str, model_dir: Path, data: Path, workdir: Path, steps: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    kwargs = {"dtype": torch.bfloat16}
    if "QLoRA" in row:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LEARNING_RATE,
        bf16=True,
        max_length=1024,
        use_liger_kernel="liger" in row,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, **kwargs),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    counts = {"tokens": 0, "supervised": 0}
    collate = trainer.data_collator

    def counting(features):
        batch_ = collate(features)
        mask = batch_.get("attention_mask")
        counts["tokens"] += int(mask.sum()) if mask is not None else int(batch_["input_ids"].numel())
        counts["supervised"] += int((batch_["labels"] != -100).sum())
        return batch_

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"seconds": time.perf_counter() - started, **counts, "final_loss": losses[-1] if losses else None}


def child(row: str, model_dir: Path, data: Path, steps: int, batch: int) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runner = run_trl if row.startswith("TRL") else run_ours
        try:
            result = runner(row, model_dir, data, Path(tmp), steps, batch)
        except Exception as exc:  # a row that cannot run here (a missing package) is reported, not fatal
            result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-dir", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--child")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model_dir, args.data, args.steps, args.batch)
        return
    import torch

    work = Path(tempfile.mkdtemp())
    model_dir = random_model(args.config_dir, work / "model")
    data = write_data(work / "data.jsonl")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"device: {device}; torch {torch.__version__}; random {args.config_dir.name}-shaped model; "
        f"batch {args.batch}, {args.steps} steps, {EXAMPLES} synthetic examples"
    )
    print(f"{'row':<22}{'seconds':>9}{'tok/s':>10}{'sup tok/s':>11}{'peak GPU MB':>13}{'final loss':>12}")
    results = {}
    for row in args.rows:
        command = [
            sys.executable,
            __file__,
            "--child",
            row,
            "--model-dir",
            str(model_dir),
            "--data",
            str(data),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((r for r in output.stdout.splitlines() if r.startswith("RESULT ")), None)
        r = json.loads(line[len("RESULT ") :]) if line else {"error": output.stderr[-600:]}
        results[row] = r
        if "error" in r:
            print(f"{row:<22} failed: {r['error']}", flush=True)
            continue
        print(
            f"{row:<22}{r['seconds']:>9.1f}{r['tokens'] / r['seconds']:>10.0f}{r['supervised'] / r['seconds']:>11.0f}"
            f"{r['peak_gpu_mb']:>13.0f}{r['final_loss'] or float('nan'):>12.4f}",
            flush=True,
        )
    for ours, trl in (
        ("ours bf16", "TRL bf16"),
        ("ours bf16 + liger", "TRL bf16 + liger"),
        ("ours QLoRA", "TRL QLoRA"),
    ):
        a, b = results.get(ours, {}), results.get(trl, {})
        if "seconds" in a and "seconds" in b:
            ratio = a["tokens"] / a["seconds"] / (b["tokens"] / b["seconds"])
            print(f"ratio {ours} / {trl}: non-pad tokens/s {ratio:.2f}")


if __name__ == "__main__":
    main()
