"""Training throughput: tuneship's trainer vs a plain TRL SFTTrainer, same model, data and steps, with an
ablation of each speed-up and the machine's own limit.

Usage: python benchmarks/train_throughput.py [--steps 20] [--rows all|main] [--repeat 3]
Each trainer runs in its own subprocess (so peak RSS is its own). TRL and tuneship's defaults, the ratio's two
terms, run `--repeat` times each, alternating (TRL, ours, TRL, ours, ...): a shared host's speed drifts by
10-20 % over tens of seconds, which one run of each turns into a ratio off by as much; each is printed, and the
ratio is that of the two medians (with each round's own ratio beside it). The ablation rows run once.
TRL runs with its defaults, except bf16=False / use_cpu on a CPU-only machine (its default bf16 fails there) and
the same batch size, learning rate, LoRA and step count as ours. The limit: the matmul peak this script
measures (a 2048^3 product) in the precision the row ran in, divided by the model's FLOPs per trained token
(4 x its linear-layer parameters: forward, and backward to the activations; LoRA's own weights are negligible).
Printed per row: non-pad tokens/s (the examples' tokens: the work done for the user, the ratio's measure),
computed tokens/s (what the model ran: pad tokens included, a shared prefix once) and its % of that limit, peak
RSS, final loss; then the line `ratio ours/TRL: non-pad tokens/s X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
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
PEAK_SHAPE = (2048, 2048, 2048)

# Each speed-up alone (over a baseline with all of them off) and all together (tuneship's defaults).
ALL_OFF = ["train.precision=fp32", "train.packing=false", "train.supervised_logits=false", "train.fused_lora=false"]


def only(setting: str) -> list[str]:
    """The baseline with one speed-up on: `setting` in place of its "off" value."""
    key = setting.split("=")[0]
    return [setting if off.startswith(key + "=") else off for off in ALL_OFF]


ROWS: dict[str, list[str]] = {
    "ours: none": ALL_OFF,
    "ours: bf16 autocast only": only("train.precision=bf16"),
    "ours: supervised logits only": only("train.supervised_logits=true"),
    "ours: packing only": only("train.packing=true"),
    "ours: fused LoRA layers only": only("train.fused_lora=true"),
    "ours: all but per-example attention": ["train.shared_prefix=false"],
    "ours: all but the shared prefix": ["train.shared_prefix=false"],
    "ours: all but fused LoRA layers": ["train.fused_lora=false"],
    "ours: all (defaults)": [],
}
# Packing without per-example attention: one SDPA over the packed row with transformers' block-diagonal mask
# (a shared prefix needs per-example attention, so that row has none either).
WHOLE_ROW_ATTENTION = {"ours: all but per-example attention"}
DEFAULTS = "ours: all (defaults)"


def train_clock():
    """A callback that times the training loop alone, in wall seconds and in this process's CPU seconds."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    return Clock()


def run_ours(steps: int, workdir: Path, overrides: list[str]) -> dict:
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
            *overrides,
        ],
    )
    clock = train_clock()
    result = run_train(cfg, Run.create(cfg), Console(file=open(os.devnull, "w")), fresh=True, extra_callbacks=[clock])
    return {
        "seconds": clock.wall,
        "cpu_seconds": clock.cpu,
        "tokens": result.tokens_per_second * result.seconds,
        "supervised": result.supervised_tokens_per_second * result.seconds,
        "final_loss": result.final_loss,
        "precision": result.precision,
    }


def run_trl(steps: int, workdir: Path, overrides: list[str]) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tuneship.base_model import resolve_base_model
    from tuneship.config import load_config

    cfg = load_config(QUICKSTART)
    rows = [json.loads(line) for line in open(cfg.data.sources[0], encoding="utf-8")]
    model_dir = resolve_base_model(cfg.model.base)
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
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[clock := train_clock()],
    )
    counts = {"tokens": 0, "supervised": 0, "computed": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts["tokens"] += (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        )
        counts["computed"] += int(batch["input_ids"].numel())
        counts["supervised"] += int((batch["labels"] != -100).sum())
        return batch

    trainer.data_collator = counting
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "seconds": clock.wall,
        "cpu_seconds": clock.cpu,
        **counts,
        "final_loss": losses[-1] if losses else None,
        "precision": "fp32",
    }


def count_computed_tokens(computed: dict) -> None:
    """Count the tokens our collators hand the model (pad tokens included, a shared prefix once)."""
    from tuneship.train.batches import PackCollator, PadCollator

    for collator in (PackCollator, PadCollator):

        def counting(self, features, collate=collator.__call__):
            batch = collate(self, features)
            computed["computed"] += int(batch["input_ids"].numel())
            return batch

        collator.__call__ = counting


def child(row: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if row == "TRL":
            result = run_trl(steps, Path(tmp), [])
        else:
            if row in WHOLE_ROW_ATTENTION:
                import tuneship.train.trainer

                tuneship.train.trainer.use_packed_attention = lambda model: None
            count_computed_tokens(computed := {"computed": 0})
            result = run_ours(steps, Path(tmp), ROWS[row]) | computed
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(row: str, steps: int) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", row, "--steps", str(steps)], capture_output=True, text=True, check=False
    )
    line = next((r for r in output.stdout.splitlines() if r.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{row} failed:\n{output.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def flops_per_trained_token() -> float:
    """4 x the linear-layer parameters (q, k, v, o, MLP, vocabulary projection) of the quickstart's model."""
    from tuneship.base_model import resolve_base_model
    from tuneship.config import load_config

    config = json.loads((Path(resolve_base_model(load_config(QUICKSTART).model.base)) / "config.json").read_text())
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * inner
    return 4.0 * (layers * per_layer + config["vocab_size"] * hidden)


def probe_shape_text() -> str:
    from tuneship.train.precision import PROBE_SHAPE

    return "x".join(map(str, PROBE_SHAPE))


def measurement_order(rows: str, repeat: int) -> list[str]:
    """TRL and ours alternating `repeat` times, then (--rows all) each ablation row once."""
    ablations = [name for name in ROWS if name != DEFAULTS] if rows == "all" else []
    return ["TRL", DEFAULTS] * repeat + ablations


def tokens_per_second(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def print_row(label: str, r: dict, limit: float, cores: int) -> None:
    """`limit`: the machine's tokens/s in the precision the row ran in."""
    computed = r["computed"] / r["seconds"]
    print(
        f"{label:<38}{r['precision']:>6}{r['seconds']:>9.1f}{tokens_per_second(r):>8.0f}"
        f"{computed:>10.0f}{100 * computed / limit:>8.0f}%"
        f"{r['supervised'] / r['seconds']:>11.0f}{r['tokens'] / r['cpu_seconds'] * cores:>12.0f}"
        f"{r['peak_rss_mb']:>13.0f}{r['final_loss'] or float('nan'):>12.4f}",
        flush=True,
    )


def print_ratio(trl: list[dict], ours: list[dict]) -> None:
    """The ratio of the medians of non-pad tokens/s (and of wall times), with each round's own ratio."""
    from statistics import median

    rate = median(map(tokens_per_second, ours)) / median(map(tokens_per_second, trl))
    wall = median(o["seconds"] for o in ours) / median(t["seconds"] for t in trl)
    each = ", ".join(f"{tokens_per_second(o) / tokens_per_second(t):.2f}" for t, o in zip(trl, ours))
    rounds = f" (medians of {len(trl)} rounds; each round: {each})" if len(trl) > 1 else ""
    print(f"ratio ours/TRL: non-pad tokens/s {rate:.2f}, wall time {wall:.2f}{rounds}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", choices=["all", "main"], default="all", help="main: TRL and ours only")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of TRL and ours (defaults), alternating")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    from tuneship.train.precision import BF16_MIN_SPEEDUP, cpu_matmul_rates, measure_matmul_rates, physical_cores

    load_before = os.getloadavg()[0]
    probe = cpu_matmul_rates()  # the small shape train.precision=auto measured (and cached) on this CPU
    is_bf16_slow = probe.bf16_speedup < BF16_MIN_SPEEDUP
    peak = measure_matmul_rates(PEAK_SHAPE, seconds=2.0, bf16=not is_bf16_slow)
    if is_bf16_slow:  # emulated: the large product would take minutes; the probe's rate says enough
        peak.bf16 = probe.bf16
    limits = {name: rate * 1e9 / flops_per_trained_token() for name, rate in (("bf16", peak.bf16), ("fp32", peak.fp32))}
    print(
        f"machine: {platform.machine()}, {physical_cores()} physical cores, python {platform.python_version()}; "
        f"load average {load_before:.1f} at the start; "
        f"SmolLM2-135M-Instruct, LoRA r={LORA_R}, batch {BATCH}, {args.steps} steps"
    )
    print(
        f"measured matmul peak {peak.bf16:.0f} GFLOP/s bf16"
        f"{f' (at {probe_shape_text()}: emulated)' if is_bf16_slow else ''}, {peak.fp32:.0f} fp32 ({PEAK_SHAPE[0]}^3); "
        f"{flops_per_trained_token() / 1e9:.2f} GFLOP per trained token -> limit {limits['bf16']:,.0f} tokens/s "
        f"in bf16, {limits['fp32']:,.0f} in fp32 (% limit: of the precision the row ran in)"
    )
    cores = physical_cores()
    header = (
        f"{'row':<38}{'prec':>6}{'seconds':>9}{'tok/s':>8}{'computed':>10}{'% limit':>9}{'sup tok/s':>11}"
        f"{'tok/core-s':>12}"
    )
    print(header + f"{'peak RSS MB':>13}{'final loss':>12}", flush=True)
    rounds: dict[str, list[dict]] = {}
    for name in measurement_order(args.rows, args.repeat):
        if is_bf16_slow and "train.precision=bf16" in ROWS.get(name, []):
            print(
                f"{name:<38} skipped: this CPU computes bf16 no faster than fp32 (emulated), so it would only be slow"
            )
            continue
        rounds.setdefault(name, []).append(r := measure(name, args.steps))
        label = name if args.repeat == 1 or name not in ("TRL", DEFAULTS) else f"{name} #{len(rounds[name])}"
        print_row(label, r, limits[r["precision"]], cores)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print_ratio(rounds["TRL"], rounds[DEFAULTS])
    print(
        "note: TRL's defaults put loss on every token (prompt and system prompt too), so its final loss is not "
        "comparable; tuneship supervises only answers + stop token. Threads: one per physical core in every row. "
        "tok/core-s: tokens per CPU-second of the training loop x physical cores, the rate the process would reach "
        "with the cores to itself (a check when the machine is shared; it counts threads' spin-waits as work)."
    )


if __name__ == "__main__":
    main()
