"""LoRA layers in one autograd function (train/lora_linear.py): PEFT's loss and gradients, and PEFT's own forward
wherever the fused one does not apply."""

from contextlib import contextmanager

import pytest

from tests.conftest import quiet_console, tiny_config_file
from tuneship.config import load_config
from tuneship.data.stage import run_data
from tuneship.run import Run
from tuneship.train import lora_linear
from tuneship.train.lora_linear import use_fused_lora
from tuneship.train.model import freeze_lower_layers
from tuneship.train.stage import run_train

LAYERS, LINEARS_PER_LAYER = 2, 7  # the tiny Llama: q, k, v, o, gate, up, down


def lora_model(model_dir: str, dropout: float = 0.0, **config):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", **config)
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, where A's gradient and the LoRA term are zero
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def peft_forward(model):
    """Undo use_fused_lora: every layer back to its class's (PEFT's) forward."""
    for module in model.modules():
        module.__dict__.pop("forward", None)


def loss_and_gradients(model, batch):
    import torch

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same LoRA dropout masks in both
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def a_batch():
    import torch

    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 1000, (2, 24), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


@pytest.mark.parametrize(("dropout", "train_layers"), [(0.0, 1.0), (0.1, 1.0), (0.1, 0.5)])
def test_the_fused_layers_train_as_peft_s(tiny_model_dir, dropout, train_layers):
    """No dropout (the input's two gradient terms in one product), dropout (a gradient for each), and the lower
    layers frozen (no gradient below the lowest trained layer)."""
    import torch

    model = lora_model(tiny_model_dir, dropout)
    frozen = freeze_lower_layers(model, train_layers)
    model.train()
    batch = a_batch()
    assert use_fused_lora(model) == LAYERS * LINEARS_PER_LAYER
    fused_loss, fused = loss_and_gradients(model, batch)
    peft_forward(model)
    loss, expected = loss_and_gradients(model, batch)
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert fused.keys() == expected.keys()
    assert len(expected) == 2 * LINEARS_PER_LAYER * (LAYERS - frozen)  # A and B of each trained layer
    for name, gradient in expected.items():
        assert torch.allclose(fused[name], gradient, rtol=1e-4, atol=1e-7), name


def test_peft_s_own_forward_runs_where_the_fused_one_does_not_apply(tiny_model_dir):
    """Adapters disabled (a preference trainer's reference model), merged into the base, another adapter active
    (a reference adapter added after the fused forward was given), or autocast: the fused forward would add the
    LoRA term, add it twice, add the wrong adapter's, or compute in fp32, so each equals PEFT's output exactly."""
    import torch
    from peft import LoraConfig

    model = lora_model(tiny_model_dir).eval()
    input_ids = a_batch()["input_ids"]
    cases = {
        "disabled": model.disable_adapter,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "merged": lambda: merged(model),
        "another adapter": lambda: active(model, "reference"),
    }
    model.add_adapter("reference", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
    for case, context in cases.items():
        use_fused_lora(model)
        with torch.no_grad(), context():
            fused = model(input_ids=input_ids).logits
        peft_forward(model)
        with torch.no_grad(), context():
            expected = model(input_ids=input_ids).logits
        assert torch.equal(fused, expected), case


@contextmanager
def merged(model):
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


@contextmanager
def active(model, adapter: str):
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter("default")


def test_only_plain_lora_on_full_precision_linears_is_fused(tiny_model_dir):
    assert use_fused_lora(lora_model(tiny_model_dir)) == LAYERS * LINEARS_PER_LAYER
    assert use_fused_lora(lora_model(tiny_model_dir, use_dora=True)) == 0
    assert use_fused_lora(lora_model(tiny_model_dir, lora_bias=True)) == 0


@pytest.mark.parametrize("fused", [True, False])
def test_a_training_run_takes_the_fused_layers_unless_told_not_to(tmp_path, tiny_model_dir, monkeypatch, fused):
    applied = []
    function = lora_linear.fused_lora_linear
    monkeypatch.setattr(lora_linear, "fused_lora_linear", lambda: applied.append(1) or function())
    cfg = load_config(
        tiny_config_file(tmp_path, tiny_model_dir, max_steps=2),
        ["data.eval_ratio=0", f"train.fused_lora={fused}", "train.precision=fp32"],  # auto: bf16 on avx512_bf16
    )
    run = Run.create(cfg)
    run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
    if fused:
        assert len(applied) >= 2 * LAYERS * LINEARS_PER_LAYER  # every LoRA layer, in each step's forward
    else:
        assert applied == []
