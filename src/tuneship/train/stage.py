"""The train stage: the run's data, its ChatFormat and the pre-flight checks, then LoRA training with resume."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneship.data.stage import DataResult, check_data, require_usable, run_data
from tuneship.run import Run, file_fingerprint, fingerprint

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import TrainerCallback

    from tuneship.chat.format import ChatFormat, Rendered
    from tuneship.config import Config
    from tuneship.train.trainer import TrainResult

# Settings that change what is logged, not what is learned.
NOT_INPUTS = {"sample_every", "sample_prompts", "report_to"}
# Settings read only with train.stop_when_learned: without it they change nothing (a new default of one of them
# must not make a finished run's checkpoints "made from other settings").
LEARNED_STOP_ONLY = {"stop_loss", "stop_margin", "focus_unlearned"}


@dataclass
class PreparedTraining:
    """Everything training needs, made and checked before any weight moves."""

    base_dir: str
    chat_format: ChatFormat
    data: DataResult
    rendered: list[Rendered]


def train_inputs(cfg: Config, run: Run) -> str:
    """What the adapter depends on: model, chat format, LoRA and training settings, the training split."""
    return fingerprint(
        cfg.model.model_dump(exclude=set() if cfg.model.train_on_quant else {"train_on_quant"}),
        cfg.chat.model_dump(),
        cfg.lora.model_dump(),
        cfg.train.model_dump(exclude=NOT_INPUTS if cfg.train.stop_when_learned else NOT_INPUTS | LEARNED_STOP_ONLY),
        file_fingerprint(run.data_dir / "train.jsonl"),
    )


def prepare_training(cfg: Config, run: Run, data: DataResult) -> PreparedTraining:
    """The ChatFormat (saved in <run>/chat by rank 0), the rendered examples, and the pre-flight checks."""
    from tuneship.base_model import resolve_base_model
    from tuneship.chat.format import ChatFormat
    from tuneship.train.distributed import is_main_process
    from tuneship.train.preflight import preflight

    base_dir = resolve_base_model(cfg.model.base, weights=False)  # the trainer fetches weights after its estimate
    chat_format = ChatFormat.from_model_dir(base_dir, cfg.chat)
    rendered = [chat_format.render(c) for c in data.train]
    preflight(chat_format, data.train, rendered, cfg.train.max_seq_len)
    if is_main_process():
        chat_format.save(run.chat_dir)
    return PreparedTraining(base_dir, chat_format, data, rendered)


def _data_in_memory(cfg: Config) -> DataResult:
    """What the data stage makes, without writing or recording it: the data of a DDP process other than rank 0
    (every process prepares the same data; rank 0 alone writes the run directory)."""
    from tuneship.models import base_chat_format

    result = check_data(cfg, base_chat_format(cfg).measure)
    require_usable(result, None)
    return result


def _dry_run(cfg: Config, run: Run, data: DataResult, console: Console) -> PreparedTraining:
    """--dry-run: the rendered sample, the memory estimate and the pre-flight checks; nothing is trained."""
    from tuneship.report import print_format
    from tuneship.train.device import check_memory, detect_device, estimate_for_run

    prepared = prepare_training(cfg, run, data)
    print_format(console, prepared.chat_format, data.train[:1])
    estimate = estimate_for_run(prepared.base_dir, cfg, detect_device(cfg.train.device, cfg.train.precision))
    console.print(estimate.describe())
    check_memory(estimate, console)
    console.print(f"[green]pre-flight passed[/] for {len(prepared.rendered)} examples; nothing was trained (--dry-run)")
    return prepared


def run_train(
    cfg: Config,
    run: Run,
    console: Console,
    *,
    data: DataResult | None = None,
    fresh: bool = False,
    dry_run: bool = False,
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult | PreparedTraining:
    """Train the adapter (the data stage first, unless its `data` result is given); `dry_run` stops after the
    pre-flight checks and returns what training would have used."""
    from tuneship.report import print_train
    from tuneship.train.distributed import is_main_process

    is_writer = is_main_process()
    data = data or (run_data(cfg, run, console) if is_writer else _data_in_memory(cfg))
    inputs = train_inputs(cfg, run)  # rank 0's: it alone checks the checkpoints were made from the same inputs
    if dry_run:
        return _dry_run(cfg, run, data, console)
    with run.recording("train", inputs) if is_writer else nullcontext({}) as outputs:
        prepared = prepare_training(cfg, run, data)
        train, examples = _trainer_for(cfg.train.objective, prepared)
        result = train(
            run,
            cfg,
            prepared.base_dir,
            prepared.chat_format,
            examples,
            inputs,
            console,
            fresh=fresh,
            extra_callbacks=extra_callbacks,
        )
        outputs.update(adapter=result.adapter_dir, steps=result.steps, final_loss=result.final_loss)
    if is_writer:
        print_train(console, result)
    return result


def _trainer_for(objective: str, prepared: PreparedTraining):
    """The training function of train.objective and what it trains on: SFT the rendered examples (labels on the
    answers), DPO/KTO the conversations with their rejected answers or labels (train/preference.py)."""
    if objective == "sft":
        from tuneship.train.trainer import train_adapter

        return train_adapter, prepared.rendered
    from tuneship.train.preference import train_preference

    return train_preference, prepared.data.train
