"""Preference training (train.objective dpo or kto) with TRL's DPOTrainer / KTOTrainer, on the run's ChatFormat.

The trainer is given token ids, never text: the prompt is the ChatFormat's inference prompt (the same tokens
llama.cpp and Ollama see) and every answer runs through the format's stop token, so the model still learns to
stop. (From text, TRL would tokenize with the tokenizer's own special tokens, a second BOS on some families.)

The reference model is the model training starts from: with `model.adapter_from` (a loop's champion) TRL 1.x
copies the loaded adapter into a frozen "ref" adapter and computes reference log-probs with it, so the policy is
kept near the champion, not near the bare base. The copy is made from the adapter on disk each time the trainer
is built, so a resumed run has the same reference; only the trained adapter is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneship.errors import ConfigError
from tuneship.train.trainer import TrainResult, fit, guarded, setup_training

if TYPE_CHECKING:
    from tuneship.chat.format import ChatFormat
    from tuneship.config import Config
    from tuneship.data.conversation import Conversation
    from tuneship.run import Run


def dpo_rows(chat_format: ChatFormat, conversations: list[Conversation]) -> list[dict]:
    """{prompt_ids, chosen_ids, rejected_ids} per pair (the audit made sure each has a rejected answer)."""
    rows = []
    for conversation in conversations:
        prompt_ids, chosen_ids = chat_format.prompt_answer_ids(conversation)
        _, rejected_ids = chat_format.prompt_answer_ids(conversation.with_answer(conversation.rejected))
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return rows


def kto_rows(chat_format: ChatFormat, conversations: list[Conversation], batch_size: int) -> list[dict]:
    """{prompt_ids, completion_ids, label, KL_completion_ids}: the KL term's mismatched answers are each batch's
    answers rotated by one, as TRL's own KTO preparation makes them (KTOConfig samples batches in order)."""
    rows = []
    for conversation in conversations:
        prompt_ids, completion_ids = chat_format.prompt_answer_ids(conversation)
        rows.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": conversation.is_desirable})
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        rotated = [batch[-1]["completion_ids"]] + [row["completion_ids"] for row in batch[:-1]]
        for row, kl_ids in zip(batch, rotated):
            row["KL_completion_ids"] = kl_ids
    return rows


class CountingCollator:
    """TRL's collator, counting what the trainer sees for tokens/s (every real token, and the answer tokens)."""

    def __init__(self, collator, counter):
        self.collator, self.counter = collator, counter

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        self.counter.tokens += int(batch["attention_mask"].sum())
        self.counter.supervised += int(batch["completion_mask"].sum())
        return batch


def preference_trainer(
    run: Run, cfg: Config, base_dir: str, chat_format: ChatFormat, conversations, inputs_hash: str, console, **setup
):
    """TRL's DPOTrainer or KTOTrainer (per train.objective), built on the same setup as SFT, on ChatFormat ids."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    objective = cfg.train.objective
    if objective == "kto" and cfg.train.batch_size < 2:
        raise ConfigError(
            "train.objective=kto needs train.batch_size >= 2 (its KL term pairs each prompt with another "
            "example's answer in the same batch)"
        )
    config_class, trainer_class = (DPOConfig, DPOTrainer) if objective == "dpo" else (KTOConfig, KTOTrainer)
    arguments = {
        "beta": cfg.train.beta,
        "max_length": cfg.train.max_seq_len,
        "gradient_checkpointing": False,  # TRL's default is on; tuneship's SFT trains without it
        "dataset_num_proc": None,
    }
    prepared = setup_training(run, cfg, base_dir, chat_format, inputs_hash, console, config_class, **arguments, **setup)
    if objective == "dpo":
        rows = dpo_rows(chat_format, conversations)
    else:
        rows = kto_rows(chat_format, conversations, cfg.train.batch_size)

    class Pretokenized(guarded(trainer_class)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already the ChatFormat's ids (see the module docstring)

    trainer = Pretokenized(
        model=prepared.model,
        args=prepared.args,
        train_dataset=Dataset.from_list(rows),
        processing_class=chat_format.tokenizer,
        callbacks=prepared.callbacks,
    )
    trainer.data_collator = CountingCollator(trainer.data_collator, prepared.counter)
    return trainer, prepared


def train_preference(
    run: Run,
    cfg: Config,
    base_dir: str,
    chat_format: ChatFormat,
    conversations,
    inputs_hash: str,
    console,
    *,
    fresh: bool = False,
    extra_callbacks=(),
) -> TrainResult:
    trainer, prepared = preference_trainer(
        run,
        cfg,
        base_dir,
        chat_format,
        conversations,
        inputs_hash,
        console,
        fresh=fresh,
        extra_callbacks=extra_callbacks,
    )
    return fit(trainer, prepared, run, cfg, chat_format, console)
