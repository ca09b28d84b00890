"""`model.base: <org>/<repo>`: resolved through the hub (a local server with the tiny Llama), estimated,
trained and exported; the weights are fetched only when training loads the model."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tests.conftest import tiny_config_file
from tests.hub.fake_hub import FakeHub, use_fake_hub
from tuneship.base_model import resolve_base_model
from tuneship.errors import ModelError
from tuneship.train.device import GIB, estimate_memory

REPO_ID = "acme/tiny-llama"


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_model_dir):
    files = {p.name: p.read_bytes() for p in Path(tiny_model_dir).iterdir() if p.is_file()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    with FakeHub() as server:
        server.add(REPO_ID, files)
        server.add("acme/Only-GGUF", {"model-Q8_0.gguf": b"GGUF", "README.md": b"# gguf"})
        use_fake_hub(monkeypatch, server, tmp_path / "hub-cache")
        yield server


def weight_downloads(hub) -> list[str]:
    return [p for p in hub.paths if p.endswith("model.safetensors") and not p.startswith("HEAD")]


def test_hub_id_downloads_estimates_trains_and_exports(hub, tmp_path):
    from tuneship.config import load_config
    from tuneship.export.stage import run_export
    from tuneship.run import run_train

    snapshot = Path(resolve_base_model(REPO_ID, weights=False))
    assert snapshot.parts[-4:-1] == ("hub-cache", "models--acme--tiny-llama", "snapshots")
    assert {"config.json", "tokenizer.json"} <= {p.name for p in snapshot.iterdir()}
    assert not (snapshot / "model.safetensors").exists() and not weight_downloads(hub)
    estimate = estimate_memory(str(snapshot), "fp32", lora_r=4, batch_size=4, seq_len=64, is_qlora=False, device="cpu")
    assert estimate.parameters < 2_000_000 and estimate.total < GIB

    cfg = load_config(tiny_config_file(tmp_path, REPO_ID, max_steps=2))
    console = Console(file=io.StringIO(), width=120)
    result = run_train(cfg, console)
    assert (snapshot / "model.safetensors").is_file() and len(weight_downloads(hub)) == 1
    assert Path(result.adapter_dir, "adapter_model.safetensors").is_file()
    experiment = json.loads((cfg.run_dir / "reports" / "experiment.json").read_text())
    assert experiment["memory"]["estimate"]["parameters"] == estimate.parameters

    exported = run_export(cfg, cfg.run_dir, console)
    assert (cfg.run_dir / "gguf" / "tiny-Q8_0.gguf").is_file() and exported.ggufs
    assert len(weight_downloads(hub)) == 1  # the snapshot is reused, not fetched again


def test_offline_uses_the_cached_snapshot_and_says_what_is_missing(hub, monkeypatch):
    import huggingface_hub.constants as constants

    online = resolve_base_model(REPO_ID)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.paths)
    assert resolve_base_model(REPO_ID) == online and len(hub.paths) == requests
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set and the hub cache .* has no complete copy"):
        resolve_base_model("acme/never-downloaded")


def test_missing_repo_and_gguf_only_repo_are_clear(hub):
    with pytest.raises(ModelError, match="no such repository on the hub"):
        resolve_base_model("acme/nope")
    with pytest.raises(ModelError, match="has no config.json.*tuneship hub pull"):
        resolve_base_model("acme/Only-GGUF")
