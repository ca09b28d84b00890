"""The memory estimate: from config.json, before anything is loaded; shown by --dry-run, kept with the run."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from tests.conftest import tiny_config_file
from tuneship.errors import ModelError
from tuneship.train.device import GIB, estimate_memory, memory_verdict


def parameter_count(model_dir: str) -> int:
    """What the safetensors files hold, read from their headers."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def estimate(model_dir: str, **settings):
    options = {"lora_r": 8, "batch_size": 4, "seq_len": 256, "is_qlora": False, "device": "cpu"} | settings
    return estimate_memory(model_dir, settings.pop("precision", "fp32"), **options)


def test_embedded_model_estimate_counts_its_parameters_and_fits_a_small_machine(smollm2_dir):
    result = estimate(smollm2_dir)
    assert result.parameters == pytest.approx(parameter_count(smollm2_dir), rel=0.01)
    assert result.weights == pytest.approx(4 * result.parameters, rel=0.01)
    assert result.total < 4 * GIB  # the 7B-sized guess this replaced said ~74 GiB
    assert memory_verdict(dataclasses.replace(result, available=24 * GIB)) is None


def test_tiny_model_estimate_is_exact_in_parameters_and_grows_with_the_batch(tiny_model_dir):
    small, large = estimate(tiny_model_dir, batch_size=1), estimate(tiny_model_dir, batch_size=8)
    assert small.parameters == parameter_count(tiny_model_dir)
    assert large.activations == 8 * small.activations and large.weights == small.weights


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_preference_training_counts_two_sequences_per_example(tmp_path, tiny_model_dir, objective):
    from tuneship.config import load_config
    from tuneship.train.device import detect_device, estimate_for_run

    cfg = load_config(tiny_config_file(tmp_path, tiny_model_dir))
    device = detect_device("cpu", "fp32")
    sft = estimate_for_run(tiny_model_dir, cfg, device)
    cfg.train.objective = objective
    preference = estimate_for_run(tiny_model_dir, cfg, device)
    assert preference.activations == 2 * sft.activations and preference.weights == sft.weights


def test_qlora_weights_take_an_eighth_of_fp32(smollm2_dir):
    full, qlora = estimate(smollm2_dir, device="cuda-less"), estimate(smollm2_dir, is_qlora=True, device="cuda-less")
    assert qlora.weights == pytest.approx(full.weights / 8, rel=0.001)
    assert qlora.adapter_and_optimizer == full.adapter_and_optimizer


def test_a_model_without_config_is_an_error_not_a_7b_guess(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        estimate(str(tmp_path))
    with pytest.raises(ModelError, match="no config.json"):
        estimate("HuggingFaceTB/SmolLM2-135M-Instruct")  # an unresolved hub id is no folder


def test_too_big_for_the_machine_is_an_error_tight_is_a_warning(tiny_model_dir):
    result = estimate(tiny_model_dir)
    assert memory_verdict(dataclasses.replace(result, available=result.total - 1))[0] == "error"
    assert memory_verdict(dataclasses.replace(result, available=int(result.total * 1.1)))[0] == "warning"


def test_dry_run_shows_the_estimate(tmp_path, tiny_model_dir, cli):
    result = cli("train", tiny_config_file(tmp_path, tiny_model_dir), "--dry-run")
    assert result.code == 0, result.output
    assert "memory estimate" in result.out and "GiB available on cpu" in result.out


def test_experiment_json_has_the_estimate_and_the_measured_peak(tiny_run, tiny_model_dir):
    _, run = tiny_run
    memory = json.loads((run.reports_dir / "experiment.json").read_text())["memory"]
    assert memory["estimate"]["parameters"] == parameter_count(tiny_model_dir)
    assert memory["estimate"]["total"] > 0 and memory["estimate"]["device"] == "cpu"
    assert memory["peak"]["measured_as"] == "peak RSS of the process" and memory["peak"]["bytes"] > 50_000_000
