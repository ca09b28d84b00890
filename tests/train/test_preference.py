"""DPO / KTO training (train.objective) on the tiny model: the ids TRL's trainers see, the reference model, and a
real preference signal."""

from __future__ import annotations

import pytest

from tests.conftest import qa, quiet_console, tiny_config_file, write_jsonl

PAIRS = [(f"Which colour is box {i}?", f"Box {i} is red.", f"Box {i} is blue.") for i in range(8)]


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {**qa(question, chosen), "rejected": rejected}


def preference_config(tmp_path, model_dir, objective: str, rows: list[dict], **train):
    from tuneship.config import load_config

    path = tiny_config_file(tmp_path, model_dir, objective=objective, **train)
    data = write_jsonl(tmp_path / "preferences.jsonl", rows)
    return load_config(path, [f"data.sources=[{data}]", "data.eval_ratio=0"])


def built_trainer(cfg):
    """(trainer, ChatFormat, kept conversations) as `tuneship train` builds them, before any step."""
    from tuneship.data.stage import check_data
    from tuneship.run import Run
    from tuneship.train.preference import preference_trainer
    from tuneship.train.stage import prepare_training

    run = Run.create(cfg)
    data = check_data(cfg)
    prepared = prepare_training(cfg, run, data)
    trainer, _ = preference_trainer(
        run, cfg, prepared.base_dir, prepared.chat_format, data.train, "inputs", quiet_console()
    )
    return trainer, prepared.chat_format, data.train


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def sequences(batch: dict, key: str = "input_ids") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each row, pads left out (by the masks, as the trainer reads them)."""
    rows = []
    for ids, attention, completion in zip(batch[key], batch["attention_mask"], batch["completion_mask"]):
        real = [(int(i), int(c)) for i, a, c in zip(ids, attention, completion) if a]
        rows.append(([i for i, c in real if not c], [i for i, c in real if c]))
    return rows


def test_dpo_trainer_sees_the_chat_format_prompt_and_answers_that_end_on_the_stop_token(tmp_path, tiny_model_dir):
    cfg = preference_config(tmp_path, tiny_model_dir, "dpo", [pair(*p) for p in PAIRS[:2]], batch_size=2)
    trainer, chat_format, conversations = built_trainer(cfg)
    rows = sequences(first_batch(trainer))  # chosen rows first, then rejected rows
    stop = chat_format.spec.stop_token_ids[0]
    for index, conversation in enumerate(conversations):
        prompt = chat_format.encode(chat_format.generation_prompt(conversation))
        chosen_prompt, chosen = rows[index]
        rejected_prompt, rejected = rows[index + len(conversations)]
        assert chosen_prompt == rejected_prompt == prompt
        assert chosen[-1] == rejected[-1] == stop
        answer = conversation.messages[-1].content
        assert chat_format.tokenizer.decode(chosen) == answer + chat_format.spec.stop_token
        assert chat_format.tokenizer.decode(rejected) == conversation.rejected + chat_format.spec.stop_token


def test_kto_trainer_sees_the_chat_format_prompt_labels_and_stop_token(tmp_path, tiny_model_dir):
    rows = [
        {**qa("Is the sky green?", "No, it is blue."), "label": True},
        {**qa("Is grass red?", "Yes."), "label": False},
    ]
    cfg = preference_config(tmp_path, tiny_model_dir, "kto", rows, batch_size=2)
    trainer, chat_format, conversations = built_trainer(cfg)
    batch = first_batch(trainer)
    stop = chat_format.spec.stop_token_ids[0]
    assert batch["label"].tolist() == [True, False]
    seen = sequences(batch)
    for (prompt, completion), conversation in zip(seen, conversations):
        assert prompt == chat_format.encode(chat_format.generation_prompt(conversation))
        assert completion[-1] == stop
        assert (
            chat_format.tokenizer.decode(completion) == conversation.messages[-1].content + chat_format.spec.stop_token
        )
    kl = sequences(
        {**batch, "attention_mask": batch["KL_attention_mask"], "completion_mask": batch["KL_completion_mask"]},
        "KL_input_ids",
    )
    assert kl[0] == (seen[0][0], seen[1][1]) and kl[1] == (seen[1][0], seen[0][1])  # answers rotated in the batch


def test_kto_refuses_a_batch_of_one(tmp_path, tiny_model_dir):
    from tuneship.errors import ConfigError

    cfg = preference_config(tmp_path, tiny_model_dir, "kto", [qa("Q?", "A.")], batch_size=1)
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        built_trainer(cfg)


def test_the_reference_is_the_model_training_starts_from_not_the_bare_base(tmp_path, tiny_model_dir, tiny_run):
    """With model.adapter_from (the loop's champion) the reference log-probs are the champion's."""
    import torch

    from tuneship.models import load_adapted

    _, champion_run = tiny_run
    cfg = preference_config(tmp_path, tiny_model_dir, "dpo", [pair(*p) for p in PAIRS[:2]], batch_size=2)
    cfg.model.adapter_from = str(champion_run.path)
    trainer, chat_format, conversations = built_trainer(cfg)
    batch = first_batch(trainer)
    reference_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    champion, _ = load_adapted(champion_run, dtype=torch.float32)
    with champion.disable_adapter():
        bare = [answer_log_prob(champion, chat_format, c) for c in conversations]
    expected = [answer_log_prob(champion, chat_format, c) for c in conversations]
    assert reference_chosen.tolist() == pytest.approx(expected, rel=1e-4)  # TRL sums in chunks
    assert bare != pytest.approx(expected, rel=1e-4)  # the champion's adapter changes them: the check can fail


def answer_log_prob(model, chat_format, conversation) -> float:
    import torch

    prompt, answer = chat_format.prompt_answer_ids(conversation)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    per_token = log_probs.gather(1, targets[:, None])[:, 0]
    return float(per_token[len(prompt) - 1 :].sum())


def preference_margin(run, conversations) -> float:
    """Mean log p(chosen) - log p(rejected) under the run's adapter."""
    from tuneship.models import load_adapted

    model, chat_format = load_adapted(run)
    margins = [
        answer_log_prob(model, chat_format, c) - answer_log_prob(model, chat_format, c.with_answer(c.rejected))
        for c in conversations
    ]
    return sum(margins) / len(margins)


def labelled(question: str, chosen: str, rejected: str) -> list[dict]:
    return [{**qa(question, chosen), "label": True}, {**qa(question, rejected), "label": False}]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_training_raises_chosen_over_rejected_and_keeps_the_train_stage_contracts(
    tmp_path, tiny_model_dir, objective
):
    import json

    from tuneship.run import Run
    from tuneship.train.stage import run_train

    rows = [pair(*p) for p in PAIRS] if objective == "dpo" else [r for p in PAIRS for r in labelled(*p)]
    cfg = preference_config(tmp_path, tiny_model_dir, objective, rows, max_steps=8, learning_rate=5e-3)
    run = Run.create(cfg)
    result = run_train(cfg, run, quiet_console())
    conversations = [pair_conversation(*p) for p in PAIRS]
    trained = preference_margin(run, conversations)
    untrained = _untrained_margin(cfg, run, conversations)
    assert trained > untrained + 0.4, (untrained, trained)  # measured: 0.01 -> 0.81 (dpo and kto)
    assert result.steps == 8 and (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (run.adapter_dir / "ref").exists()  # the reference adapter is not shipped
    assert json.loads((run.adapter_dir / "chat_format.json").read_text())["stop_token"] == "<|im_end|>"
    experiment = json.loads((run.reports_dir / "experiment.json").read_text())
    assert experiment["status"] == "done" and experiment["supervised_tokens"] > 0
    assert any("rewards/chosen" in entry for entry in experiment["metrics"])
    assert run.manifest()["train"].status == "done"
    assert sorted(p.name for p in run.checkpoints_dir.glob("checkpoint-*"))  # resumable


def pair_conversation(question: str, chosen: str, rejected: str):
    from tuneship.data.conversation import Conversation, Message, SourceRef

    messages = [Message("user", question), Message("assistant", chosen)]
    return Conversation(messages, SourceRef("pairs", 0), rejected=rejected)


def _untrained_margin(cfg, run, conversations) -> float:
    """The margin before any step: the base model's (a new LoRA adapter starts as the identity)."""
    import torch

    from tuneship.chat.format import ChatFormat
    from tuneship.models import load_base

    chat_format = ChatFormat.load(run.adapter_dir)
    model = load_base(cfg.model.base, chat_format, dtype=torch.float32).eval()
    margins = [
        answer_log_prob(model, chat_format, c) - answer_log_prob(model, chat_format, c.with_answer(c.rejected))
        for c in conversations
    ]
    return sum(margins) / len(margins)


def test_an_interrupted_dpo_run_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path, tiny_model_dir, tiny_run):
    """From a champion's adapter (the loop's case), with the reference adapter beside the trained one."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from tuneship.run import Run
    from tuneship.train.stage import run_train

    _, champion_run = tiny_run
    cfg = preference_config(
        tmp_path, tiny_model_dir, "dpo", [pair(*p) for p in PAIRS], max_steps=4, save_steps=2, batch_size=2
    )
    cfg.model.adapter_from = str(champion_run.path)
    run = Run.create(cfg)
    run_train(cfg, run, quiet_console())
    whole = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    shutil.rmtree(run.checkpoints_dir / "checkpoint-4")  # as if killed after the checkpoint at step 2
    shutil.rmtree(run.adapter_dir)
    run.manifest_path.unlink()
    resumed = run_train(cfg, run, quiet_console())
    assert resumed.resumed_from == str(run.checkpoints_dir / "checkpoint-2") and resumed.steps == 4
    again = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    assert whole.keys() == again.keys()
    assert all(torch.allclose(whole[k], again[k], atol=1e-6) for k in whole)
