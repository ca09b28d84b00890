"""train.stop_when_learned (on for the loop's cycles): the learned check runs only at the end of an epoch whose
training loss is below train.stop_loss, and a run that never gets there trains its whole budget. That training
stops once SmolLM2 learned its examples, and that greedy decoding then gives each, is checked end to end
(tests/e2e/test_loop_smollm2.py): the tiny random model cannot learn its answers in seconds."""

import json

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
    from tuneship.train.callbacks import learned_examples

    _, run = tiny_run
    model, chat_format = load_adapted(run)
    conversations = list(read_conversations(run.data_dir / "train.jsonl"))
    rendered = [chat_format.render(c) for c in conversations]
    examples = [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered]
    learned, loss = learned_examples(model, examples)
    prompts = [chat_format.generation_prompt(c) for c in conversations]
    exact = sum(
        a.text == c.messages[-1].content and a.stopped
        for a, c in zip(generate_answers(model, chat_format, prompts, 16), conversations)
    )
    assert learned == exact and loss > 0


def test_an_answer_token_chosen_by_less_than_the_margin_is_not_learned():
    """Seen on SmolLM2: a correction's first token won by 0.125 in PyTorch and lost on the quantized base."""
    import torch

    from tuneship.chat.format import IGNORE_INDEX
    from tuneship.train.callbacks import learned_rows

    logits = torch.zeros(3, 2, 4)
    logits[:, 0, 1] = 5.0  # position 0: token 1 by 5
    logits[0, 1, 2], logits[0, 1, 3] = 2.0, 1.875  # row 0, position 1: token 2 by 0.125
    logits[1, 1, 2] = 2.0  # row 1: token 2 by 2
    targets = torch.tensor([[1, 2], [1, 2], [1, IGNORE_INDEX]])  # row 2's second position is not supervised
    supervised = targets != IGNORE_INDEX
    assert learned_rows(logits, targets, supervised, 0.0).tolist() == [True, True, True]
    assert learned_rows(logits, targets, supervised, 1.0).tolist() == [False, True, True]
    assert learned_rows(logits, targets, supervised, 6.0).tolist() == [False, False, False]
