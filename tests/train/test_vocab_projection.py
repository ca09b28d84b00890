"""The vocabulary projection through oneDNN where this CPU measured it faster (train/vocab_projection.py): the
model's logits and gradient to fp32 rounding, the verdict measured once, PyTorch's own product wherever it does
not apply."""

import json
import platform

import pytest
import torch

from tuneship.train import vocab_projection
from tuneship.train.vocab_projection import measure_projection, onednn_is_faster, use_onednn_projection

ONEDNN_HERE = platform.machine() == "x86_64" and torch.backends.mkldnn.is_available()


@pytest.fixture(params=[True, False], ids=["onednn", "mkl"])
def onednn_chosen(request, monkeypatch):
    """Each verdict the probe may give, whatever this CPU measured."""
    if request.param and not ONEDNN_HERE:
        pytest.skip("no oneDNN for fp32 on this machine")
    monkeypatch.setattr(vocab_projection, "onednn_is_faster", lambda: request.param)
    return request.param


def frozen_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    return model


def logits_and_gradient(head, hidden):
    hidden = hidden.detach().requires_grad_(True)
    logits = head(hidden)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), hidden.grad


def test_the_projection_gives_the_model_s_logits_and_gradient(tiny_model_dir, onednn_chosen):
    model = frozen_model(tiny_model_dir)
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = logits_and_gradient(model.lm_head, hidden)
    assert use_onednn_projection(model) == onednn_chosen
    assert ("forward" in vars(model.lm_head)) == onednn_chosen
    for got, want in zip(logits_and_gradient(model.lm_head, hidden), expected, strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own bf16 product, as without it
        assert model.lm_head(hidden).dtype == torch.bfloat16


def test_a_projection_that_trains_keeps_its_own_forward(tiny_model_dir, onednn_chosen):
    model = frozen_model(tiny_model_dir)
    model.lm_head.weight.requires_grad_(True)  # the tied embedding trains (no LoRA-only run does this)
    assert not use_onednn_projection(model) and "forward" not in vars(model.lm_head)


def test_the_verdict_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path))
    measured = measure_projection((8, 64, 512), seconds=0.02)
    assert measured["mkl_seconds"] > 0
    if ONEDNN_HERE:
        assert measured["onednn_speedup"] == pytest.approx(measured["mkl_seconds"] / measured["onednn_seconds"])
    verdict = onednn_is_faster()
    [entry] = json.loads((tmp_path / "cpu_gemm.json").read_text()).values()
    assert verdict == (entry["onednn_speedup"] >= 1.0)
    written = (tmp_path / "cpu_gemm.json").stat().st_mtime_ns
    assert onednn_is_faster() == verdict and (tmp_path / "cpu_gemm.json").stat().st_mtime_ns == written


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_run_takes_it_in_fp32_only(tmp_path, tiny_model_dir, monkeypatch, onednn_chosen, precision):
    """bf16 autocast computes the projection its own way (oneDNN's bf16 product already)."""
    from tests.conftest import quiet_console, tiny_config_file
    from tuneship.config import load_config
    from tuneship.data.stage import run_data
    from tuneship.run import Run
    from tuneship.train.stage import run_train

    applied = []
    function = vocab_projection._onednn_projection
    monkeypatch.setattr(vocab_projection, "_onednn_projection", lambda: applied.append(1) or function())
    cfg = load_config(
        tiny_config_file(tmp_path, tiny_model_dir, max_steps=2), ["data.eval_ratio=0", f"train.precision={precision}"]
    )
    run = Run.create(cfg)
    run_train(cfg, run, quiet_console(), data=run_data(cfg, run, quiet_console()))
    assert bool(applied) == (onednn_chosen and precision == "fp32")
