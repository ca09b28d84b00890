"""Trainer callbacks: guards that stop a run cleanly, sample generation, progress, and the log.

A guard raises `TrainingStopped` from inside the training loop, before the optimizer step (NaN) or
before the save (disk): the weights of the last checkpoint are never overwritten by a bad step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from tuneship.chat.format import IGNORE_INDEX
from tuneship.disk import require_disk
from tuneship.errors import TrainingStopped
from tuneship.train.batches import SHARED_PREFIX, TokenCounter

NAN_ADVICE = (
    "try a lower train.learning_rate, train.precision=fp32, or another device; the last good "
    "checkpoint is kept and `tuneship train` resumes from it"
)


def stop_on_non_finite(norm, model, step: int) -> None:
    """Stops the training when `norm`, the gradients' total norm, is not finite, naming the first non-finite
    gradient; called before the optimizer applies them (a NaN or inf anywhere makes the norm non-finite)."""
    if norm is None or math.isfinite(float(norm)):
        return
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            raise TrainingStopped(f"non-finite gradient in {name} at step {step}; {NAN_ADVICE}")
    raise TrainingStopped(f"the gradient norm overflowed at step {step}; {NAN_ADVICE}")


def check_loss(loss, step: int) -> None:
    """Called by the trainer on every micro-batch loss (the HF Trainer would hide NaN in its logs)."""
    value = float(loss)
    if not math.isfinite(value):
        raise TrainingStopped(f"loss is {value} at step {step}; {NAN_ADVICE}")


class DiskGuard(TrainerCallback):
    """Before each save: is there room for the checkpoint plus train.min_free_disk_gb?"""

    def __init__(self, folder: Path, checkpoint_bytes: int, min_free_bytes: int):
        self.folder = folder
        self.checkpoint_bytes = checkpoint_bytes
        self.min_free_bytes = min_free_bytes

    def check(self, what: str) -> None:
        require_disk(
            self.folder,
            self.checkpoint_bytes + self.min_free_bytes,
            f"{what} ({self.checkpoint_bytes / 1e9:.2f} GB) plus train.min_free_disk_gb={self.min_free_bytes / 1e9:g}",
            "free space or lower the limit, then rerun `tuneship train` to resume from the last checkpoint",
        )

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.check(f"checkpoint {state.global_step}")


class SampleGenerator(TrainerCallback):
    """Every N steps, greedy answers to fixed prompts through the run's own generation prompt."""

    def __init__(self, chat_format, prompts: list[str], every: int, log_path: Path, console, max_new_tokens=64):
        self.chat_format = chat_format
        self.prompts = prompts
        self.every = every
        self.log_path = log_path
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.max_new_tokens = max_new_tokens

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.prompts or state.global_step % self.every:
            return
        from tuneship.chat.generation import generate_answers

        answers = generate_answers(
            model, self.chat_format, [self.chat_format.prompt_for(p) for p in self.prompts], self.max_new_tokens
        )
        with open(self.log_path, "a", encoding="utf-8") as log:
            for prompt, answer in zip(self.prompts, answers):
                log.write(json.dumps({"step": state.global_step, "prompt": prompt, **answer.to_json()}) + "\n")
                self.console.print(
                    f"[dim]step {state.global_step} sample[/] {prompt!r} -> {answer.text!r}"
                    f"{'' if answer.stopped else ' [red](did not stop)[/]'}",
                    highlight=False,
                )


class ProgressDisplay(TrainerCallback):
    """A rich progress bar with loss, tokens/s and ETA; also keeps timings for the experiment log."""

    def __init__(self, console, counter: TokenCounter, *, is_shown: bool = True):
        self.console = console
        self.counter = counter
        self.is_shown = is_shown
        self.progress = None
        self.task = None
        self.started = 0.0
        self.loss = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.started = time.monotonic()
        if not self.is_shown:
            return
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        from tuneship.train.distributed import global_sum

        tokens = global_sum(self.counter.tokens)  # every process calls it; all processes' tokens per second
        if self.progress is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        status = f"loss {self.loss:.4f}  {tokens / elapsed:,.0f} tok/s"
        self.progress.update(self.task, completed=state.global_step, status=status)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class LearnedStop(TrainerCallback):
    """train.stop_when_learned: at each epoch's end, stop once every training example is learned: at each of its
    answer's tokens (its stop token included) the most likely next token, teacher-forced, is the right one, which
    is what greedy decoding needs to give the answer exactly, by at least `margin` in logits (what serves is a
    quantized base in llama.cpp: a token chosen by 0.1 over the next was seen to flip there); and the mean loss
    over the answers is below `stop_loss`. One forward pass over the examples (in the training's precision), no
    generation, and only once the epoch's training loss is below `stop_loss`. The epochs (or max_steps) stay the
    budget. With a `focus` sampler (train.focus_unlearned), the epochs after a check train the examples not learned
    yet and as many of those learned by the smallest margin (`focus_indices`); after such an epoch the check looks
    at those first, and at every example once they are all learned: training stops only on a check of every
    example."""

    def __init__(
        self,
        examples: list[dict],
        stop_loss: float,
        margin: float,
        collate,
        focus: FocusSampler | None = None,
        batch: int = 8,
        cache=None,
    ):
        self.examples = examples
        self.collate = collate
        self.stop_loss = stop_loss
        self.margin = margin
        self.focus = focus
        self.batch = batch
        self.epoch_losses: list[float] = []
        self.last: Check | None = None  # the last check of every example, updated by focused checks
        self.cache = cache  # train/frozen_layers.py

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.epoch_losses.append(float(logs["loss"]))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        losses, self.epoch_losses = self.epoch_losses, []
        if not losses or sum(losses) / len(losses) >= self.stop_loss:
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16 and args.use_cpu)):
            if self.focus is not None and self.focus.indices is not None and not self.focused_learned(model, state):
                return
            check = learned_examples(model, self.examples, self.collate, self.margin, cache=self.cache)
        record = self.record(state, check)
        if check.is_passed(self.stop_loss):
            control.should_training_stop = True
        elif self.focus is not None:
            self.refocus(check, record)

    def focused_learned(self, model, state) -> bool:
        """After a focused epoch, whether the examples it trained are all learned now (then every example is
        checked); if not, the next epochs focus on those still not learned, without checking the others: they
        were learned at the last check of every example, and one that slipped since is found by the next."""
        indices = self.focus.indices
        focused = [self.examples[i] for i in indices]
        check = learned_examples(model, focused, self.collate, self.margin, cache=self.cache)
        if all(check.flags):
            return True
        self.refocus(self.last.updated(indices, check), self.record(state, check, focused=True))
        return False

    def refocus(self, check: Check, record: dict) -> None:
        """The next epochs' examples after `check` (of every example): see focus_indices."""
        self.last = check
        self.focus.indices = focus_indices(check.flags, self.batch, check.margins)
        record["next_epoch"] = self.focus.epoch_size

    def record(self, state, check: Check, focused: bool = False) -> dict:
        """The check in the run's log history (experiment.json): on `focused` examples only, or on all of them."""
        flags = check.flags
        record = {"epoch": round(state.epoch or 0.0, 2), "learned": sum(flags), "of": len(flags), "loss": check.loss}
        record |= ({"focused": True} if focused else {}) | {"step": state.global_step}
        state.log_history.append(record)  # refocus adds next_epoch to this dict
        return record


class FocusSampler(torch.utils.data.Sampler):
    """The training order: every example, shuffled in the order the HF Trainer's own sampler gives (accelerate's
    SeedableRandomSampler: a permutation drawn from `seed` + the epoch), or, once `indices` is set (by
    LearnedStop), only those, shuffled the same way. Until a check sets `indices`, a run trains exactly as without
    it. Its length stays the dataset's, which is what the Trainer plans its epochs and budget with; an epoch over
    fewer examples ends after fewer steps. The focus is not in a checkpoint: a resumed run trains every example
    again until its next check."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.indices: list[int] | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def epoch_size(self) -> int:
        """How many examples an epoch trains now."""
        return self.size if self.indices is None else len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        """This epoch's random numbers (the same on a rerun)."""
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def __iter__(self):
        chosen = self.indices if self.indices is not None else range(self.size)
        order = torch.randperm(len(chosen), generator=self.generator()).tolist()
        self.epoch += 1
        return iter([chosen[i] for i in order])


def focus_indices(flags: list[bool], batch: int, margins: list[float]) -> list[int] | None:
    """The next epochs' examples after a learned check (`flags`: learned or not; `margins`: by how much each
    example's least sure answer token won): those not learned yet, and as many learned ones (at least enough to
    fill a `batch`), rehearsed so they are kept: those learned by the smallest margin, the first to slip below it
    while the others train. None (all of them) when every example or none is learned."""
    unlearned = [i for i, learned in enumerate(flags) if not learned]
    learned = [i for i, learned in enumerate(flags) if learned]
    if not unlearned or not learned:
        return None
    share = min(len(learned), max(len(unlearned), batch - len(unlearned)))
    rehearsed = sorted(learned, key=lambda i: margins[i])[:share]
    return sorted(unlearned + rehearsed)


@dataclass
class Check:
    """A learned check: per example, whether it is learned (every supervised token the argmax by the margin) and
    its margin (by how much its least sure supervised token won; negative: lost), and the mean loss over all
    supervised tokens."""

    flags: list[bool]
    margins: list[float]
    loss: float

    def is_passed(self, stop_loss: float) -> bool:
        return all(self.flags) and self.loss < stop_loss

    def updated(self, indices: list[int], focused: Check) -> Check:
        """This check of every example, with what a later check of those at `indices` found."""
        flags, margins = list(self.flags), list(self.margins)
        for index, flag, margin in zip(indices, focused.flags, focused.margins):
            flags[index], margins[index] = flag, margin
        return Check(flags, margins, self.loss)


def learned_examples(
    model, examples: list[dict], collate, margin: float = 0.0, batch_size: int = 16, cache=None
) -> Check:
    """Each of `examples` checked: learned by `margin` or not (see Check). `collate` makes the batches, as in
    training (train/batches.py: packed rows with a shared prefix once, or padded rows), and `cache` gives the
    frozen layers' output (train/frozen_layers.py). Only the positions that predict a supervised token are
    projected onto the vocabulary (train/loss.py)."""
    from tuneship.train.frozen_layers import serving
    from tuneship.train.loss import kept_logits, model_inputs, next_token_targets

    was_training = model.training
    model.eval()
    margins, total_loss, total_tokens = [], 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                features = examples[start : start + batch_size]
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(features).items()}
                positions, targets = next_token_targets(batch)
                batch = model_inputs(batch)
                with serving(cache, batch):
                    logits = kept_logits(model, batch, positions).float()
                supervised = targets != IGNORE_INDEX
                owners = example_owners(batch, positions, len(features)).expand_as(targets)
                least = token_margins(logits, targets).masked_fill(~supervised, math.inf)
                per_example = torch.full((len(features),), math.inf, device=least.device)
                margins += per_example.scatter_reduce_(0, owners.flatten(), least.flatten(), "amin").tolist()
                loss = torch.nn.functional.cross_entropy(logits[supervised], targets[supervised], reduction="sum")
                total_loss += float(loss)
                total_tokens += int(supervised.sum())
    finally:
        model.train(was_training)
    return Check([m >= margin for m in margins], margins, total_loss / max(total_tokens, 1))


def example_owners(batch: dict, positions, examples: int):
    """(rows, positions): which example of the batch each kept position predicts a token of: a padded batch's
    row, or, in a packed row (train/batches.py), the example whose span holds the position (after the shared
    prefix, segment 0, when there is one)."""
    bounds = batch.get("cu_seq_lens_q")
    if bounds is None:
        return torch.arange(examples, device=positions.device)[:, None].expand(examples, positions.numel())
    segments = torch.searchsorted(bounds, positions.to(bounds.dtype), right=True) - 1
    return (segments - (1 if batch.get(SHARED_PREFIX) else 0)).unsqueeze(0)


def token_margins(logits, targets):
    """Per (row, position) of logits (batch, positions, vocab): by how much the target's logit beats every other
    token's (negative: another token wins)."""
    index = targets.clamp(min=0).unsqueeze(-1)
    right = logits.gather(-1, index).squeeze(-1)
    best_other = logits.scatter(-1, index, float("-inf")).max(-1).values
    return right - best_other
