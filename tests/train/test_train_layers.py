"""train.train_layers (loop.train_layers in cycles: 0.5 in adapter format by default): only the LoRA weights of
the top share of the layers train, warm-started from model.adapter_from; those below keep the loaded adapter's
values exactly."""

import json
from contextlib import nullcontext

import pytest

from tests.conftest import quiet_console, tiny_config_file
from tuneship.config import load_config
from tuneship.data.stage import run_data
from tuneship.run import Run
from tuneship.train.stage import run_train


def lora_weights(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_a_run_trains_the_top_layers_lora_and_keeps_the_loaded_adapter_below(tmp_path, tiny_model_dir, tiny_run):
    _, champion_run = tiny_run
    cfg = load_config(tiny_config_file(tmp_path, tiny_model_dir, max_steps=3), ["data.eval_ratio=0"])
    cfg.model.adapter_from = str(champion_run.path)
    cfg.train.train_layers = 0.5  # the tiny model's 2 layers: layer 1 trains, layer 0 stays the champion's
    run = Run.create(cfg)
    run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
    champion, trained = lora_weights(champion_run.adapter_dir), lora_weights(run.adapter_dir)
    assert trained.keys() == champion.keys()
    below = [name for name in trained if ".layers.0." in name]
    above = [name for name in trained if ".layers.1." in name]
    assert below and above and len(below) + len(above) == len(trained)
    assert all(trained[name].equal(champion[name]) for name in below)
    assert all(not trained[name].equal(champion[name]) for name in above if "lora_B" in name)
    metrics = json.loads((run.reports_dir / "experiment.json").read_text())["metrics"]
    assert [m["step"] for m in metrics if "loss" in m and "step" in m][:3] == [1, 2, 3]


def test_the_share_of_layers_that_train_rounds_to_whole_layers_and_never_to_none(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneship.train.model import freeze_lower_layers

    def trained_layers(share: float) -> set[str]:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
        frozen = freeze_lower_layers(model, share)
        names = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert frozen == 2 - len(names)
        lora = [
            (n, type(m.lora_dropout["default"]).__name__)
            for n, m in model.named_modules()
            if hasattr(m, "lora_dropout")
        ]
        assert lora and all((kind == "Dropout") == (n.split(".layers.")[1].split(".")[0] in names) for n, kind in lora)
        return names

    assert trained_layers(1.0) == {"0", "1"}
    assert trained_layers(0.5) == {"1"}
    assert trained_layers(0.1) == {"1"}  # at least the top layer trains


def test_the_frozen_layers_output_kept_per_example_gives_the_same_logits_in_any_packing(tmp_path, tiny_model_dir):
    """Kept from batches packed one way (a shared system prompt once), given back for batches packed another way:
    the logits are those of the frozen layers computed again."""
    import torch

    from tuneship.data.conversation import read_conversations
    from tuneship.models import base_chat_format
    from tuneship.train.attention import use_packed_attention
    from tuneship.train.batches import ExampleDataset, PackCollator
    from tuneship.train.device import detect_device
    from tuneship.train.frozen_layers import frozen_layers_cache
    from tuneship.train.loss import model_inputs
    from tuneship.train.model import freeze_lower_layers, load_for_training

    overrides = ["chat.system_prompt=Answer from the facts.", "data.eval_ratio=0"]
    cfg = load_config(tiny_config_file(tmp_path, tiny_model_dir), overrides)
    chat_format = base_chat_format(cfg)
    model = load_for_training(tiny_model_dir, chat_format, cfg.lora, detect_device("cpu", "fp32"))
    use_packed_attention(model)
    model.eval()
    run = Run.create(cfg)
    run_data(cfg, run, quiet_console())
    examples = ExampleDataset([chat_format.render(c) for c in read_conversations(run.data_dir / "train.jsonl")])
    examples = examples.examples
    cache = frozen_layers_cache(model, freeze_lower_layers(model, 0.5), 10_000, packed=True)
    collate = PackCollator(share_prefix=True)

    def logits(features, use_cache: bool):
        batch = collate(features)
        assert batch.get("shared_prefix_tokens", 0) > 0 or len(features) == 1
        with torch.no_grad(), cache.serving(batch) if use_cache else nullcontext(batch.pop("example_indices")):
            return model(**model_inputs(batch), use_cache=False).logits

    for start in range(0, 12, 4):  # kept in batches of 4
        logits(examples[start : start + 4], use_cache=True)
    assert sorted(cache.states) == list(range(12))
    for features in ([examples[i] for i in (7, 2, 11)], examples[5:6], examples[::2]):
        assert torch.allclose(logits(features, use_cache=True), logits(features, use_cache=False), atol=1e-5)


def test_a_run_with_the_frozen_layers_kept_trains_as_one_that_computes_them_every_step(
    tmp_path, tiny_model_dir, tiny_run, monkeypatch
):
    import tuneship.train.trainer as trainer
    from tuneship.train.frozen_layers import FrozenLayersCache

    served = []
    replaced = FrozenLayersCache._replaced
    monkeypatch.setattr(FrozenLayersCache, "_replaced", lambda self, output: served.append(1) or replaced(self, output))
    _, champion_run = tiny_run
    losses = {}
    for kept in (True, False):
        if not kept:
            monkeypatch.setattr(trainer, "frozen_layers_cache", lambda *args: None)
        cfg = load_config(tiny_config_file(tmp_path / str(kept), tiny_model_dir, max_steps=8), ["data.eval_ratio=0"])
        cfg.model.adapter_from = str(champion_run.path)
        cfg.train.train_layers = 0.5
        run = Run.create(cfg)
        run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
        metrics = json.loads((run.reports_dir / "experiment.json").read_text())["metrics"]
        losses[kept] = [m["loss"] for m in metrics if "loss" in m and "step" in m and "train_runtime" not in m]
    assert len(losses[True]) == 8  # 3 epochs of 3 steps: the later ones from the kept states
    assert len(served) == 5  # steps 4 to 8 took the kept states instead of computing layer 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
