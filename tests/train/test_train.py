"""Training on a tiny random Llama with the real SmolLM2 tokenizer: real runs, seconds each."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, quiet_console, start_until_checkpoint, tiny_config_file
from tuneship.config import load_config
from tuneship.errors import PreflightError, TrainingStopped
from tuneship.run import Run
from tuneship.train.stage import run_train


def tiny_config(tmp_path: Path, model_dir: str, **train) -> Path:
    return tiny_config_file(tmp_path, model_dir, **{"max_steps": 6, **train})


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def test_train_writes_adapter_chat_format_and_reports(tmp_path, tiny_model_dir, cli):
    result = cli("train", tiny_config(tmp_path, tiny_model_dir))
    assert result.code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "chat_format.json").read_text())["stop_token"] == "<|im_end|>"
    assert (
        "<|im_start|>" in json.loads((adapter / "tokenizer_config.json").read_text()).get("chat_template", "")
        or "<|im_start|>" in (adapter / "chat_template.jinja").read_text()
    )
    experiment = json.loads((run_dir / "reports" / "experiment.json").read_text())
    assert experiment["status"] == "done" and experiment["steps"] == 6
    assert experiment["data"]["totals"]["kept"] == 12 and "torch" in experiment["versions"]
    assert any("loss" in entry for entry in experiment["metrics"])
    assert (run_dir / "reports" / "loss.png").stat().st_size > 1000
    assert checkpoint_steps(run_dir) == [4, 6]  # save_total_limit=2 bounds the count
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["status"] == "done" and manifest["train"]["status"] == "done"
    assert load_config(run_dir / "config.yaml").model.base == tiny_model_dir


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    def poison(module, inputs, output):
        return output * float("nan")

    class PoisonLossAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                model.get_base_model().model.norm.register_forward_hook(poison)

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, max_steps=10))
    with pytest.raises(TrainingStopped, match=r"loss is nan at step 6; try a lower train.learning_rate"):
        run_train(cfg, Run.create(cfg), quiet_console(), extra_callbacks=[PoisonLossAtStep()])
    run_dir = tmp_path / "runs" / "tiny"
    assert checkpoint_steps(run_dir) == [2, 4]
    weights = load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert not (run_dir / "adapter").exists()
    assert json.loads((run_dir / "reports" / "experiment.json").read_text())["status"].startswith(
        "stopped: loss is nan"
    )


def test_disk_guard_stops_before_the_first_save(tmp_path, tiny_model_dir, cli):
    config = tiny_config(tmp_path, tiny_model_dir)
    result = cli("train", config, "--set", "train.min_free_disk_gb=1000000")
    assert result.code == TrainingStopped.exit_code and "disk guard:" in result.err
    assert "Traceback" not in result.output
    assert checkpoint_steps(tmp_path / "runs" / "tiny") == []


def test_sigkill_mid_run_then_rerun_resumes_from_latest_checkpoint(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=400, save_steps=5, batch_size=2)
    command = [sys.executable, "-m", "tuneship.cli", "train", str(config)]
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    process = start_until_checkpoint(command, checkpoints)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(checkpoint_steps(tmp_path / "runs" / "tiny"))
    assert killed_at < 400
    rerun = subprocess.run(command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout and f"checkpoint-{killed_at}" in rerun.stdout.replace("\n", "")
    state = json.loads((checkpoints / "checkpoint-400" / "trainer_state.json").read_text())
    assert state["global_step"] == 400
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "runs" / "tiny" / "adapter"
    )


def test_changed_settings_refuse_to_resume_old_checkpoints(tmp_path, tiny_model_dir, cli):
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2)
    assert cli("train", config).code == 0
    result = cli("train", config, "--set", "train.learning_rate=5e-4")
    assert result.code == 1 and "--fresh" in result.err
    assert cli("train", config, "--set", "train.learning_rate=5e-4", "--fresh").code == 0


def test_learned_stop_settings_are_training_inputs_only_with_the_learned_stop(tmp_path, tiny_model_dir):
    from tuneship.config import load_config
    from tuneship.run import Run
    from tuneship.train.stage import train_inputs

    def inputs(*overrides):
        cfg = load_config(tiny_config(tmp_path, tiny_model_dir), list(overrides))
        return train_inputs(cfg, Run.create(cfg))

    assert inputs() == inputs("train.stop_margin=0.5", "train.stop_loss=0.2", "train.focus_unlearned=false")
    learned = "train.stop_when_learned=true"
    assert inputs(learned) != inputs(learned, "train.stop_margin=0.5") != inputs(learned, "train.stop_loss=0.2")
    assert inputs() != inputs("train.learning_rate=5e-4")


def test_dry_run_prints_the_rendered_sample_and_trains_nothing(tmp_path, tiny_model_dir, cli):
    result = cli("train", tiny_config(tmp_path, tiny_model_dir), "--dry-run")
    out = result.out
    assert result.code == 0 and "pre-flight passed" in out and "Answer number" in out and "generation prompt" in out
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_preflight_names_examples_that_would_not_learn_to_stop(tokenizer):
    from tuneship.chat.format import IGNORE_INDEX, ChatFormat
    from tuneship.data.conversation import Conversation, Message, SourceRef
    from tuneship.train.preflight import preflight

    chat_format = ChatFormat.from_tokenizer(tokenizer)
    conversation = Conversation([Message("user", "Q"), Message("assistant", "A")], SourceRef("d.jsonl", 7))
    rendered = chat_format.render(conversation)
    rendered.labels = [
        IGNORE_INDEX if t in chat_format.spec.stop_token_ids else label
        for t, label in zip(rendered.input_ids, rendered.labels)
    ]
    with pytest.raises(PreflightError, match=r"1 of 1 examples do not supervise the stop token .* d.jsonl:7"):
        preflight(chat_format, [conversation], [rendered], 64)
    rendered.labels = [IGNORE_INDEX] * len(rendered.labels)
    with pytest.raises(PreflightError, match="have no supervised token"):
        preflight(chat_format, [conversation], [rendered], 64)


def test_qlora_without_cuda_is_a_clear_error(tmp_path, tiny_model_dir, cli):
    result = cli("train", tiny_config(tmp_path, tiny_model_dir), "--set", "lora.qlora=true")
    assert result.code == 1 and "lora.qlora=true needs a CUDA GPU" in result.err


def test_samples_without_tensorboard_are_written(tmp_path, tiny_model_dir, cli):
    """TensorBoard made reports/ before the first sample; without it the folder did not exist yet."""
    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2, sample_every=1, sample_prompts=["Question number 1?"])
    result = cli("train", config, "--set", "train.report_to=[]")
    assert result.code == 0, result.output
    samples = (tmp_path / "runs" / "tiny" / "reports" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in samples] == [1, 2]


# Training losses of the tiny model, seed 42, 6 steps: a change in batching, masking, precision or the
# schedule shows here first. Recorded on CPU (fp32); update them only for a change meant to alter training.
TINY_LOSSES = [10.8801, 10.8119, 10.8591, 10.8398, 10.8674, 10.7962]


def test_seeded_tiny_training_reproduces_its_loss_values(tmp_path, tiny_model_dir):
    # eval_ratio 0: the split ranks records by their file path, which differs from one tmp_path to the next
    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, max_steps=6), ["data.eval_ratio=0"])
    run_train(cfg, Run.create(cfg), quiet_console())
    experiment = json.loads((tmp_path / "runs" / "tiny" / "reports" / "experiment.json").read_text())
    losses = [round(entry["loss"], 4) for entry in experiment["metrics"] if "loss" in entry]
    assert losses == pytest.approx(TINY_LOSSES, abs=2e-3), losses


@pytest.mark.parametrize(
    ("bad", "message"),
    [(None, None), (float("nan"), r"non-finite gradient in 1\.weight at step 8"), (3e38, "gradient norm overflowed")],
)
def test_the_gradient_guard_names_the_non_finite_gradient_before_clipping(tmp_path, bad, message):
    import torch
    from transformers import Trainer, TrainingArguments

    from tuneship.train.trainer import guarded

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter: not in the optimizer, so not in the norm
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_grad_norm=1.0, report_to=[])
    trainer = guarded(Trainer)(model=model, args=args)
    trainer.create_optimizer()
    trainer.state.global_step = 7
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 2.0)
    if bad is not None:
        model[1].weight.grad[0, 0] = bad
    expected = [parameter.grad.clone() for parameter in model.parameters()]
    if message is not None:
        with pytest.raises(TrainingStopped, match=message):
            trainer._clip_grad_norm(model)
        for parameter, gradient in zip(model.parameters(), expected):  # left as they were: nothing clipped
            assert torch.allclose(parameter.grad, gradient, equal_nan=True)
        return
    reference = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if p.requires_grad]
    for copy, parameter in zip(reference, (p for p in model.parameters() if p.requires_grad)):
        copy.grad = parameter.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)  # what the HF Trainer computes, trained ones
    assert torch.equal(trainer._clip_grad_norm(model), expected_norm)
    for copy, parameter in zip(reference, (p for p in model.parameters() if p.requires_grad)):
        assert torch.equal(parameter.grad, copy.grad)
    assert torch.equal(model[0].bias.grad, expected[1])  # the frozen parameter's gradient is not clipped


def test_an_adapter_trained_on_the_served_quant_names_it_and_finds_the_base_s_ggufs(tmp_path, tiny_model_dir, cli):
    """model.train_on_quant (the loop's adapter-format cycles set it): the adapter trains on the base quant's weights,
    dequantized, and names that folder as its base, which leads to the base's own GGUFs (export.merge: false)."""
    from tuneship.config import load_config
    from tuneship.base_gguf import SERVED_MARK, base_gguf
    from tuneship.models import adapter_base_dir
    from tuneship.run import Run
    from tuneship.train.stage import train_inputs

    config = tiny_config(tmp_path, tiny_model_dir, max_steps=2)
    assert cli("train", config, "--set", "model.train_on_quant=Q8_0").code == 0
    cfg = load_config(config, ["model.train_on_quant=Q8_0"])
    trained_on = Path(adapter_base_dir(Run.of(cfg)))
    assert (trained_on / SERVED_MARK).is_file() and trained_on.name == "hf-Q8_0"
    assert base_gguf(trained_on, "Q8_0") == base_gguf(tiny_model_dir, "Q8_0") == trained_on.parent / "base-Q8_0.gguf"
    assert train_inputs(cfg, Run.of(cfg)) != train_inputs(load_config(config), Run.of(cfg))
