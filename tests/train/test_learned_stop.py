"""train.stop_when_learned (on for the loop's cycles): the learned check runs only at the end of an epoch whose
training loss is below train.stop_loss, and a run that never gets there trains its whole budget. That training
stops once SmolLM2 learned its examples, and that greedy decoding then gives each, is checked end to end
(tests/e2e/test_loop_smollm2.py): the tiny random model cannot learn its answers in seconds."""

import json

import pytest

from tests.conftest import quiet_console, tiny_config_file
from tuneship.config import load_config
from tuneship.data.stage import run_data
from tuneship.run import Run
from tuneship.train.stage import run_train


def test_a_run_whose_loss_stays_high_is_never_checked_and_trains_its_whole_budget(tmp_path, tiny_model_dir):
    overrides = {"max_steps": -1, "epochs": 3, "stop_when_learned": True}
    cfg = load_config(tiny_config_file(tmp_path, tiny_model_dir, **overrides), ["data.eval_ratio=0"])
    run = Run.create(cfg)
    result = run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
    metrics = json.loads((run.reports_dir / "experiment.json").read_text())["metrics"]
    assert min(m["loss"] for m in metrics if "loss" in m) > cfg.train.stop_loss
    assert not [m for m in metrics if "learned" in m]
    assert result.steps == 3 * -(-12 // cfg.train.batch_size)


def test_the_learned_check_counts_an_example_only_when_greedy_decoding_would_give_its_answer(tiny_run):
    from tuneship.chat.generation import generate_answers
    from tuneship.data.conversation import read_conversations
    from tuneship.models import load_adapted
    from tuneship.train.batches import PadCollator
    from tuneship.train.callbacks import learned_examples

    _, run = tiny_run
    model, chat_format = load_adapted(run)
    conversations = list(read_conversations(run.data_dir / "train.jsonl"))
    rendered = [chat_format.render(c) for c in conversations]
    examples = [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered]
    check = learned_examples(model, examples, PadCollator(chat_format.spec.pad_token_id))
    prompts = [chat_format.generation_prompt(c) for c in conversations]
    exact = sum(
        a.text == c.messages[-1].content and a.stopped
        for a, c in zip(generate_answers(model, chat_format, prompts, 16), conversations)
    )
    assert sum(check.flags) == exact and len(check.flags) == len(examples) and check.loss > 0
    assert check.flags == [margin >= 0.0 for margin in check.margins]


def test_the_check_on_the_training_s_packed_batches_finds_what_the_padded_check_finds(tiny_run):
    """LearnedStop checks with the training's collator: examples packed in one row, their shared start (system
    prompt) once. Half the examples answer what the model itself says greedily (learned), half their taught
    answers (not learned by the tiny random model): the packed check says which, as the padded one does."""
    import torch

    from tuneship.data.conversation import read_conversations
    from tuneship.models import load_adapted
    from tuneship.train.attention import use_packed_attention
    from tuneship.train.batches import PackCollator, PadCollator
    from tuneship.train.callbacks import learned_examples

    _, run = tiny_run
    model, chat_format = load_adapted(run)
    examples = []
    for number, conversation in enumerate(list(read_conversations(run.data_dir / "train.jsonl"))[:8]):
        rendered = chat_format.render(conversation)
        if number % 2:
            examples.append({"input_ids": rendered.input_ids, "labels": rendered.labels})
            continue
        prompt = chat_format.encode(chat_format.generation_prompt(conversation))
        with torch.no_grad():
            answer = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
        examples.append({"input_ids": prompt + answer.tolist(), "labels": [-100] * len(prompt) + answer.tolist()})
    padded = learned_examples(model, examples, PadCollator(chat_format.spec.pad_token_id), margin=0.0)
    use_packed_attention(model)
    packed = learned_examples(model, examples, PackCollator(share_prefix=True), margin=0.0, batch_size=8)
    assert PackCollator(share_prefix=True)(examples)["shared_prefix_tokens"] > 0
    assert padded.flags == packed.flags == [True, False] * 4
    assert packed.loss == pytest.approx(padded.loss, rel=1e-4)
    assert packed.margins == pytest.approx(padded.margins, rel=1e-3, abs=1e-3)


def test_an_answer_token_chosen_by_less_than_the_margin_is_not_learned():
    """Seen on SmolLM2: a correction's first token won by 0.125 in PyTorch and lost on the quantized base."""
    import torch

    from tuneship.train.callbacks import token_margins

    logits = torch.zeros(3, 2, 4)
    logits[:, 0, 1] = 5.0  # position 0: token 1 by 5
    logits[0, 1, 2], logits[0, 1, 3] = 2.0, 1.875  # row 0, position 1: token 2 by 0.125
    logits[1, 1, 2] = 2.0  # row 1: token 2 by 2
    targets = torch.tensor([[1, 2], [1, 2], [1, 3]])  # row 2, position 1: token 3 loses to token 1 by 0
    assert token_margins(logits, targets).tolist() == [[5.0, 0.125], [5.0, 2.0], [5.0, 0.0]]
    logits[2, 1, 1] = 1.5
    assert token_margins(logits, targets)[2].tolist() == [5.0, -1.5]


def test_after_a_check_the_next_epochs_train_the_unlearned_and_as_many_learned_examples():
    """The learned examples rehearsed are those learned by the smallest margin: the first to slip."""
    from tuneship.train.callbacks import focus_indices

    flags = [True] * 38 + [False] * 2
    margins = [3.0] * 30 + [1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 5.0, 5.0] + [0.5, -2.0]
    focus = focus_indices(flags, 8, margins)
    assert focus == list(range(30, 36)) + [38, 39]  # 2 unlearned + the 6 learned by the least: one full batch
    focus = focus_indices([True] * 10 + [False] * 12, 8, [2.0] * 22)
    assert set(range(10, 22)) <= set(focus) and len(focus) == 22  # 12 unlearned + the 10 learned (fewer than 12)
    margins = [float(40 - i) for i in range(30)] + [0.0] * 10
    assert focus_indices([True] * 30 + [False] * 10, 8, margins) == list(range(20, 40))
    assert focus_indices([True] * 5, 8, [2.0] * 5) is None and focus_indices([False] * 5, 8, [0.0] * 5) is None


def test_the_focus_sampler_shuffles_every_example_until_it_is_told_which():
    import torch

    from tuneship.train.callbacks import FocusSampler

    sampler = FocusSampler(10, seed=3)
    assert sorted(sampler) == list(range(10)) and len(sampler) == 10
    sampler.indices = [2, 5, 7]
    assert sorted(sampler) == [2, 5, 7] and len(sampler) == 10  # the Trainer plans with the dataset's length
    sampler.set_epoch(4)
    assert list(sampler) == [[2, 5, 7][i] for i in torch.randperm(3, generator=torch.Generator().manual_seed(7))]


def test_a_run_trains_its_later_epochs_on_what_the_check_found_unlearned_and_stops_once_all_are(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The HF Trainer with the focus sampler: after the first check (2 of 9 examples not learned), the next epoch
    is those 2 and 2 learned ones (1 step of 4 instead of 3). After it only those 4 are checked: one is still not
    learned, so the next epoch focuses again (it and 3 learned ones). After that one its 4 are learned, so all 9
    are checked, and training stops. The checks' outcomes are scripted here (the tiny random model learns nothing
    in seconds); what a check computes is tested above, and on SmolLM2 in the loop's end-to-end test."""
    import tuneship.train.callbacks as callbacks

    from tuneship.train.callbacks import Check

    scripted = [(9, [True] * 7 + [False] * 2), (4, [True, True, True, False]), (4, [True] * 4), (9, [True] * 9)]
    outcomes = iter(scripted)

    def check(model, examples, collate, margin, cache=None):
        count, flags = next(outcomes)
        assert len(examples) == count
        return Check(flags, [2.0 if flag else 0.0 for flag in flags], 0.01)

    monkeypatch.setattr(callbacks, "learned_examples", check)
    overrides = {"max_steps": -1, "epochs": 5, "stop_when_learned": True, "stop_loss": 100.0}
    cfg = load_config(tiny_config_file(tmp_path, tiny_model_dir, **overrides), ["data.eval_ratio=0.25"])
    run = Run.create(cfg)
    result = run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
    checks = [m for m in json.loads((run.reports_dir / "experiment.json").read_text())["metrics"] if "learned" in m]
    summary = [(c["learned"], c["of"], c.get("focused", False), c.get("next_epoch")) for c in checks]
    assert summary == [(7, 9, False, 4), (3, 4, True, 4), (9, 9, False, None)]
    assert next(outcomes, None) is None
    assert result.steps == 3 + 1 + 1  # epoch 1: 9 examples in batches of 4; epochs 2 and 3: 4 focused ones each


def test_until_a_check_focuses_it_a_run_trains_exactly_as_with_the_trainer_s_own_sampler(tmp_path, tiny_model_dir):
    """The same order, so the same loss at every step, with train.focus_unlearned on and off (the tiny model
    never learns an example, so no check ever sets a focus)."""
    losses = {}
    for focus in (True, False):
        overrides = {"max_steps": -1, "epochs": 3, "stop_when_learned": True, "focus_unlearned": focus}
        cfg = load_config(tiny_config_file(tmp_path / str(focus), tiny_model_dir, **overrides), ["data.eval_ratio=0"])
        run = Run.create(cfg)
        run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
        metrics = json.loads((run.reports_dir / "experiment.json").read_text())["metrics"]
        losses[focus] = [m["loss"] for m in metrics if "loss" in m and "learned" not in m]
    assert len(losses[True]) == 9 and losses[True] == losses[False]
