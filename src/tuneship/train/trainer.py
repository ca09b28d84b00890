"""Train a LoRA adapter with the HF Trainer, guarded, checkpointed and resumable."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneship.errors import TuneshipError
from tuneship.train.allocator import kept_heap
from tuneship.train.attention import use_packed_attention
from tuneship.train.batches import ExampleDataset, PackCollator, PadCollator, TokenCounter
from tuneship.train.device import (
    check_memory,
    detect_device,
    estimate_for_run,
    measured_peak_memory,
    reset_peak_memory,
)
from tuneship.train.distributed import world_size
from tuneship.train.frozen_layers import frozen_layers_cache, serving
from tuneship.train.walks import flat_walks

if TYPE_CHECKING:
    from tuneship.config import Config
    from tuneship.run import Run

CHECKPOINT_PREFIX = "checkpoint-"
SHARDED = ("FSDP", "DEEPSPEED", "XLA", "MEGATRON_LM")  # accelerate's DistributedType: clipping is theirs
COMPLETE_MARKERS = ("trainer_state.json", "adapter_model.safetensors")


class ResumeMismatch(TuneshipError):
    """The checkpoints were written for other data or settings."""


@dataclass
class TrainResult:
    adapter_dir: str
    resumed_from: str | None
    steps: int
    final_loss: float | None
    seconds: float
    tokens_per_second: float
    supervised_tokens_per_second: float
    device: str
    precision: str
    notes: list[str] = field(default_factory=list)

    @property
    def detail(self) -> str:
        loss = f", final loss {self.final_loss:.4f}" if self.final_loss is not None else ""
        return f"{self.steps} steps in {self.seconds:.0f} s{loss} -> {self.adapter_dir}"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written completely (trainer_state.json is written last)."""
    if not folder.is_dir():
        return None
    complete = [
        p
        for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and all((p / m).is_file() for m in COMPLETE_MARKERS)
    ]
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


@dataclass
class TrainingSetup:
    """What every objective's trainer is built from: checked device and memory, arguments, checkpoints to resume,
    the model with its adapter, and the callbacks (guards, progress, samples)."""

    device: Any
    estimate: Any
    args: Any
    resume: Path | None
    model: Any
    frozen_layers: int  # train.train_layers: the lowest layers, whose LoRA stays as loaded
    counter: TokenCounter
    progress: Any
    disk_guard: Any
    callbacks: list


def setup_training(
    run: Run,
    cfg: Config,
    base_dir: str,
    chat_format,
    inputs_hash: str,
    console,
    arguments_class,
    *,
    fresh: bool = False,
    extra_callbacks=(),
    **extra_arguments,
) -> TrainingSetup:
    """Everything before the trainer: `arguments_class` is TrainingArguments or a TRL config (its own settings in
    `extra_arguments`)."""
    from transformers import set_seed

    from tuneship.base_gguf import served_base_dir
    from tuneship.base_model import fetch_weights
    from tuneship.train import callbacks as cb
    from tuneship.train.distributed import is_main_process
    from tuneship.train.lora_linear import use_fused_lora
    from tuneship.train.model import freeze_lower_layers, load_for_training, trainable_bytes
    from tuneship.train.precision import set_compute_threads
    from tuneship.train.vocab_projection import use_onednn_projection

    device = detect_device(cfg.train.device, cfg.train.precision)
    if device.kind == "cpu":
        set_compute_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    _check_kernels(cfg.train.kernels, device)
    estimate = estimate_for_run(base_dir, cfg, device)
    check_memory(estimate, console)
    fetch_weights(base_dir)
    if cfg.model.train_on_quant:
        base_dir = str(served_base_dir(base_dir, cfg.model.train_on_quant))
    checkpoints = run.checkpoints_dir
    args = _training_arguments(arguments_class, cfg, device, checkpoints, **extra_arguments)
    with args.main_process_first(desc="checkpoints"):  # rank 0 clears (--fresh) before the others look
        resume = _prepare_checkpoints(checkpoints, inputs_hash, fresh, is_writer=is_main_process())
    set_seed(cfg.train.seed)  # LoRA's initial weights: the same run twice, or on N processes, starts the same
    model = load_for_training(base_dir, chat_format, cfg.lora, device, cfg.model.adapter_from)
    frozen_layers = freeze_lower_layers(model, cfg.train.train_layers)
    if cfg.train.fused_lora:
        use_fused_lora(model)
    if device.kind == "cpu" and device.precision == "fp32":  # autocast's bf16 projection is oneDNN's already
        use_onednn_projection(model)
    model.config.use_cache = False  # a cache in a training forward hides packed sequences from the mask
    counter = TokenCounter()
    progress = cb.ProgressDisplay(console, counter, is_shown=is_main_process())
    disk_guard = cb.DiskGuard(
        checkpoints, 4 * trainable_bytes(model) + 1_000_000, int(cfg.train.min_free_disk_gb * 1e9)
    )
    callbacks = [disk_guard, progress, *extra_callbacks]
    if cfg.train.sample_every and cfg.train.sample_prompts and is_main_process():
        callbacks.append(
            cb.SampleGenerator(
                chat_format,
                cfg.train.sample_prompts,
                cfg.train.sample_every,
                run.reports_dir / "samples.jsonl",
                console,
            )
        )
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.reports_dir / "tensorboard")
    return TrainingSetup(device, estimate, args, resume, model, frozen_layers, counter, progress, disk_guard, callbacks)


def guarded(trainer_class):
    """`trainer_class` whose every step's loss is checked: a NaN/inf stops training with the last good checkpoint."""
    from tuneship.train import callbacks as cb

    class Guarded(trainer_class):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            cb.check_loss(loss, self.state.global_step + 1)
            return loss

        def _clip_grad_norm(self, model):
            """The HF Trainer's gradient clipping, with the guard on the norm it computes anyway: a non-finite
            gradient stops the training, named, before the clip or the optimizer applies it. Unsharded, the norm
            is over the optimizer's parameters (the HF Trainer walks every frozen one as well, and the guard was a
            second norm: 1 % of a SmolLM2 step on a CPU)."""
            import torch

            step = self.state.global_step + 1
            if self.accelerator.distributed_type in SHARDED or self._has_mixed_mesh_grads(model):
                norm = super()._clip_grad_norm(model)
                cb.stop_on_non_finite(norm, model, step)
                return norm
            self.accelerator.unscale_gradients()  # fp16's loss scale, as accelerate's clip_grad_norm_ does
            trained = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in trained])
            cb.stop_on_non_finite(norm, model, step)
            torch.nn.utils.clip_grads_with_norm_(trained, self.args.max_grad_norm, norm)
            return norm

        def floating_point_ops(self, inputs) -> int:
            """The HF Trainer's estimate (6 x tokens x non-embedding parameters) for `total_flos`, with the
            parameter count taken once, not walked over every parameter at every step."""
            if "input_ids" not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if not hasattr(self, "_counted_parameters"):
                self._counted_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs["input_ids"].numel() * self._counted_parameters

    return Guarded


def train_adapter(
    run: Run,
    cfg: Config,
    base_dir: str,
    chat_format,
    train_set,
    inputs_hash: str,
    console,
    *,
    fresh: bool = False,
    extra_callbacks=(),
) -> TrainResult:
    """SFT: the rendered examples (labels only on the answers) with the HF Trainer."""
    from transformers import Trainer, TrainingArguments

    setup = setup_training(
        run,
        cfg,
        base_dir,
        chat_format,
        inputs_hash,
        console,
        TrainingArguments,
        fresh=fresh,
        extra_callbacks=extra_callbacks,
    )
    is_supervised_logits = cfg.train.supervised_logits and cfg.train.kernels != "liger"

    class GuardedTrainer(guarded(Trainer)):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with serving(cache, inputs):
                if not is_supervised_logits or return_outputs:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                return _supervised_mean_loss(self, model, inputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            return focus or super()._get_train_sampler(train_dataset)

    dataset = ExampleDataset(train_set)
    attends_per_example = cfg.train.packing and setup.model.config._attn_implementation == "sdpa"
    if attends_per_example:
        use_packed_attention(setup.model)
    tokens = sum(len(example["input_ids"]) for example in dataset.examples)
    cache = frozen_layers_cache(setup.model, setup.frozen_layers, tokens, cfg.train.packing)
    collate = batch_collator(cfg, chat_format, attends_per_example)
    focus = learned_stop(cfg, dataset, setup.callbacks, collate, cache)
    trainer = GuardedTrainer(
        model=setup.model,
        args=setup.args,
        train_dataset=dataset,
        data_collator=batch_collator(cfg, chat_format, attends_per_example, setup.counter),
        callbacks=setup.callbacks,
    )
    return fit(trainer, setup, run, cfg, chat_format, console)


def batch_collator(cfg: Config, chat_format, attends_per_example: bool, counter: TokenCounter | None = None):
    """The training's batches: packed (a shared prefix only where our attention function reads it, not
    flash-attention's) or padded; `counter` counts their tokens."""
    if cfg.train.packing:
        return PackCollator(counter, share_prefix=attends_per_example and cfg.train.shared_prefix)
    return PadCollator(chat_format.spec.pad_token_id, counter)


def learned_stop(cfg: Config, dataset: ExampleDataset, callbacks: list, collate, cache=None):
    """With train.stop_when_learned, the LearnedStop callback over `dataset` added to `callbacks` (its checks
    batch the examples with `collate`, as the training does, and take the frozen layers' output from `cache`);
    returns the sampler it focuses (train.focus_unlearned, one process: several would each have to cut their
    epochs alike), else None."""
    from tuneship.train.callbacks import FocusSampler, LearnedStop

    if not cfg.train.stop_when_learned:
        return None
    focus = FocusSampler(len(dataset), cfg.train.seed) if cfg.train.focus_unlearned and world_size() == 1 else None
    train = cfg.train
    callbacks.append(
        LearnedStop(dataset.examples, train.stop_loss, train.stop_margin, collate, focus, train.batch_size, cache)
    )
    return focus


def fit(trainer, setup: TrainingSetup, run: Run, cfg: Config, chat_format, console) -> TrainResult:
    """Train (from the checkpoint to resume, if any), save the adapter with the ChatFormat, write the reports."""
    from transformers.trainer_callback import PrinterCallback

    from tuneship.train.distributed import global_sum, is_main_process

    trainer.remove_callback(PrinterCallback)  # the progress bar and experiment.json carry the metrics
    resume, counter, device, model = setup.resume, setup.counter, setup.device, setup.model
    started = time.monotonic()
    status = "failed"
    reset_peak_memory(device.kind)
    try:
        if resume and is_main_process():
            console.print(f"resuming from {resume} (use --fresh to start over)")
        # a step's memory is the next step's, not page-faulted in again (train/allocator.py); the HF Trainer's
        # per-step walks over every module cut short when there is nothing to change (train/walks.py)
        with kept_heap(), flat_walks(model):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        counter.tokens, counter.supervised = global_sum(counter.tokens), global_sum(counter.supervised)
        adapter_dir = run.adapter_dir
        if is_main_process():
            setup.disk_guard.check("the final adapter")
            model.save_pretrained(adapter_dir, selected_adapters=[model.active_adapter])  # not DPO/KTO's reference
            chat_format.save(adapter_dir)
        status = "done"
    except TuneshipError as exc:
        status = f"stopped: {exc}"
        raise
    finally:
        setup.progress.stop()
        seconds = time.monotonic() - started
        if is_main_process():
            _write_reports(run, cfg, trainer, device, counter, seconds, status, resume, setup.estimate)
    history = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return TrainResult(
        str(adapter_dir),
        str(resume) if resume else None,
        trainer.state.global_step,
        history[-1] if history else None,
        seconds,
        counter.tokens / max(seconds, 1e-9),
        counter.supervised / max(seconds, 1e-9),
        device.kind,
        device.precision,
        device.notes,
    )


def _supervised_mean_loss(trainer, model, inputs, num_items_in_batch):
    """The loss the HF Trainer expects from a model that takes `num_items_in_batch`: summed over this
    micro-batch, divided by the supervised tokens of the whole step (all accumulation steps, all processes),
    times the process count (DDP averages gradients over processes)."""
    from peft.helpers import disable_input_dtype_casting

    from tuneship.train.loss import supervised_loss_sum

    # Under autocast, PEFT's cast of each LoRA input to the adapter's fp32 is undone by autocast's cast back to
    # bf16 for the matmul: two copies of every activation, forward and backward, for the same result.
    with disable_input_dtype_casting(model, active=trainer.args.bf16 or trainer.args.fp16):
        total, count = supervised_loss_sum(model, inputs)
    if num_items_in_batch is None:
        return total / max(count, 1)
    loss = total / num_items_in_batch
    if trainer.args.average_tokens_across_devices:
        loss = loss * trainer.accelerator.num_processes
    return loss


def _check_kernels(kernels: str, device) -> None:
    if kernels != "liger":
        return
    if device.kind != "cuda":
        raise TuneshipError(
            f"train.kernels=liger needs a CUDA GPU (this run is on {device.kind}); use train.kernels=torch"
        )
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        raise TuneshipError("train.kernels=liger needs liger-kernel: pip install 'tuneship[liger]'") from None


def _training_arguments(TrainingArguments, cfg, device, checkpoints: Path, **extra):
    train = cfg.train
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        lr_scheduler_type="cosine",
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        bf16=device.precision == "bf16",
        fp16=device.precision == "fp16",
        use_cpu=device.kind == "cpu",
        report_to=list(train.report_to),
        remove_unused_columns=False,
        dataloader_pin_memory=device.kind == "cuda",
        use_liger_kernel=train.kernels == "liger",
        ddp_backend="gloo" if device.kind == "cpu" and world_size() > 1 else None,
        disable_tqdm=True,
        **extra,
    )


def _prepare_checkpoints(checkpoints: Path, inputs_hash: str, fresh: bool, *, is_writer: bool) -> Path | None:
    """Clear for --fresh; otherwise the checkpoint to resume from, if it was made from the same inputs.
    Only the writer (rank 0) clears, checks and marks (a mismatch there stops every process); the others look
    after it."""
    marker = checkpoints / "inputs.json"
    if fresh and is_writer:
        shutil.rmtree(checkpoints, ignore_errors=True)
    resume = latest_checkpoint(checkpoints)
    if is_writer and resume and marker.is_file() and json.loads(marker.read_text())["inputs"] != inputs_hash:
        raise ResumeMismatch(
            f"the checkpoints in {checkpoints} were made from other data or training settings; "
            "rerun with --fresh to start over, or restore the previous config"
        )
    if is_writer:
        checkpoints.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"inputs": inputs_hash}))
    return resume


def _write_reports(run: Run, cfg, trainer, device, counter, seconds, status, resume, estimate) -> None:
    reports = run.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    history = trainer.state.log_history
    experiment = {
        "status": status,
        "resumed_from": str(resume) if resume else None,
        "config": cfg.model_dump(mode="json"),
        "data": _audit_totals(run.data_dir / "audit.json"),
        "device": asdict(device),
        "versions": _versions(),
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,  # the budget (train.epochs or train.max_steps)
        "seconds": round(seconds, 2),
        "processes": world_size(),
        "tokens": counter.tokens,
        "supervised_tokens": counter.supervised,
        "memory": {"estimate": estimate.to_json(), "peak": measured_peak_memory(device.kind)},
        "metrics": history,
    }
    (reports / "experiment.json").write_text(json.dumps(experiment, indent=2, default=str), encoding="utf-8")
    _plot_loss(history, reports / "loss.png")


def _audit_totals(audit: Path) -> dict:
    if not audit.is_file():
        return {}
    report = json.loads(audit.read_text(encoding="utf-8"))
    return {"totals": report["totals"], "counts": report["counts"], "stats": report["stats"]}


def _versions() -> dict[str, str]:
    import importlib.metadata

    names = ["tuneship", "torch", "transformers", "peft", "accelerate", "trl"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _plot_loss(history: list[dict], path: Path) -> None:
    points = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([s for s, _ in points], [loss for _, loss in points])
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("loss")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
