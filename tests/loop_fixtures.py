"""A tiny base run taken through the whole pipeline (trained, evaluated, exported to a Q8_0 GGUF), the v1 of
the loop tests and the serve tests."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import made_once, tiny_config_file


def served(store, generation_id: str, question: str, answer: str, *, model: str = "tiny", backend: str = "test"):
    """One question and its answer stored as a served generation of v1 (as /v1/chat/completions records it)."""
    return store.add_generation(
        id=generation_id,
        model=model,
        version_id=1,
        backend=backend,
        messages=[{"role": "user", "content": question}],
        answer=answer,
        finish_reason="stop",
        latency_ms=1.0,
        prompt_tokens=None,
        completion_tokens=None,
    )


def tiny_loop_config(folder: Path, model_dir: str, **loop) -> Path:
    path = tiny_config_file(folder, model_dir, max_steps=2)
    config = yaml.safe_load(path.read_text())
    config["deploy"] = {"target": "none"}
    config["serve"] = {"trigger_every": 0, "max_tokens": 16}
    config["loop"] = {"min_examples": 2, "lease_seconds": 30, **loop}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_base_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The trained and exported base run (session-wide, read only: copy it with `fresh_loop_dir`)."""
    from rich.console import Console

    from tuneship.config import load_config
    from tuneship.pipeline import run_pipeline

    def make(folder: Path) -> None:
        summary = run_pipeline(load_config(tiny_loop_config(folder, tiny_model_dir)), Console(file=io.StringIO()))
        assert not summary.failed, summary.stages

    return load_config(made_once(tmp_path_factory, "tiny-loop", make) / "run.yaml").run_dir


@pytest.fixture
def fresh_loop_dir(tiny_base_run, tmp_path) -> Path:
    """A copy of the base run in its own runs folder (its own store), for one test to change."""
    target = tmp_path / "runs" / tiny_base_run.name
    shutil.copytree(tiny_base_run, target, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["run"]["dir"] = str(tmp_path / "runs")
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    return target
