"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama with it, and file helpers.

Converted models are cached under <repo>/.cache/tuneship (TUNESHIP_CACHE), so only the first run
pays the GGUF dequantization (~20 s).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TUNESHIP_CACHE", str(REPO / ".cache" / "tuneship"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_the_cores_among_test_workers() -> None:
    """Under pytest-xdist each worker (and every process it starts: servers, cycles, llama.cpp) computes with its
    share of the cores, as OMP_NUM_THREADS says (train/precision.py): with two workers of two threads each on two
    cores, the quickstart run took 590 s in the suite against about 180 s alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        from tuneship.train.precision import compute_threads

        os.environ["OMP_NUM_THREADS"] = str(compute_threads(processes_per_machine=workers))


_share_the_cores_among_test_workers()


def pytest_collection_modifyitems(config, items):
    """The longest test file first (marked `longest`: the loop's SmolLM2 end-to-end tests, which make the
    quickstart run the other end-to-end files then find made), then the tests that need no SmolLM2, then the
    other end-to-end tests; otherwise in their order. In two xdist workers one starts the longest file at once
    while the other works through the rest, instead of both waiting on it at the end."""

    def rank(item) -> int:
        if item.get_closest_marker("longest"):
            return 0
        return 2 if item.get_closest_marker("e2e") else 1

    items.sort(key=rank)


def write_jsonl(path: Path, rows) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="session", autouse=True)
def no_base_ggufs_of_gone_bases():
    """The cache's GGUFs of earlier sessions' tiny bases, whose folders pytest has removed since (it keeps the last
    three sessions'), are removed: the development cache does not grow with every run."""
    from tuneship.base_gguf import BASE_RECORD
    from tuneship.paths import cache_dir

    for record in (cache_dir() / "base-gguf").glob(f"*/{BASE_RECORD}"):
        try:
            gone = not Path(json.loads(record.read_text())["base"]).exists()
        except FileNotFoundError:  # another worker's cleanup
            continue
        if gone:
            shutil.rmtree(record.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from tuneship.base_model import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_dir, tmp_path_factory) -> str:
    """Only the tokenizer files of SmolLM2 (a real tokenizer), for format tests."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by `make(folder)` once per test session: under pytest-xdist in the session's
    folder that every worker shares, by the first worker that needs it (the others wait on the lock, then read
    it), so a fixture every worker uses is built once, not once per worker."""
    from tuneship.disk import locked

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, made = shared / name, shared / f"{name}.made"
    with locked(shared / f"{name}.lock"):
        if not made.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed first try left
            folder.mkdir(parents=True)
            make(folder)
            made.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir, tmp_path_factory) -> str:
    """A 2-layer, 32-wide random Llama with the real SmolLM2 tokenizer: trains in seconds on CPU."""
    return str(made_once(tmp_path_factory, "tiny-llama", lambda folder: make_tiny_model(smollm2_tokenizer_dir, folder)))


def make_tiny_model(tokenizer_dir: str, folder: Path) -> str:
    """The tiny random Llama saved into `folder` (also used by benchmarks/serve_load.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_config_file(tmp_path: Path, model_dir: str, **train) -> Path:
    """A run config for the tiny model on 12 numbered facts."""
    import yaml

    data = write_jsonl(
        tmp_path / "facts.jsonl", [qa(f"Question number {i}?", f"Answer number {i}.") for i in range(12)]
    )
    config = {
        "run": {"name": "tiny", "dir": str(tmp_path / "runs")},
        "model": {"base": model_dir},
        "data": {"sources": [str(data)], "eval_ratio": 0.25},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "max_seq_len": 64,
            "max_steps": 6,
            "batch_size": 4,
            "save_steps": 2,
            "learning_rate": 1e-3,
            "report_to": [],
            **train,
        },
        "eval": {"train_prompts": 3, "max_new_tokens": 8, **TINY_GATES_OFF},
        "export": {"quants": ["Q8_0"]},
        "deploy": {"target": "none"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_until_checkpoint(command: list[str], checkpoints: Path, timeout: float = 300):
    """Start `command` (from the repo root) and return the process once a checkpoint is complete in `checkpoints`."""
    import subprocess
    import time

    process = subprocess.Popen(command, cwd=REPO, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    return process


# A random 2-layer model answers garbage: its runs switch the quality gates off (tests of the gates don't).
TINY_GATES_OFF = {
    "min_stop_rate": 0.0,
    "min_non_empty_rate": 0.0,
    "max_loop_rate": 1.0,
    "max_leak_rate": 1.0,
    "min_recall": 0.0,
}


def quiet_console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """(config, Run) of a tiny run through every stage (`tuneship run`, deploy target none): trained (2 steps),
    evaluated, exported (f16 + Q8_0), template-checked, Modelfile written. Shared: no test may change it (a
    test that needs a variant works on `copy_run`); the session checks that at its end."""
    from tuneship.config import load_config
    from tuneship.pipeline import run_pipeline
    from tuneship.run import Run

    def make(folder: Path) -> None:
        run_pipeline(load_config(tiny_config_file(folder, tiny_model_dir, max_steps=2)), quiet_console())

    cfg = load_config(made_once(tmp_path_factory, "tiny-run", make) / "run.yaml")
    run = Run.of(cfg)
    before = _snapshot(run.path)
    yield cfg, run
    assert _snapshot(run.path) == before, "a test changed the shared tiny run: copy it with copy_run instead"


def copy_run(tiny_run, parent: Path):
    """A copy of the shared tiny run in `parent`/runs/<name>, with its config.yaml pointing there."""
    from tuneship.config import load_config, save_config
    from tuneship.run import Run

    cfg, run = tiny_run
    target = parent / "runs" / run.path.name
    shutil.copytree(run.path, target, ignore=shutil.ignore_patterns("checkpoints"))
    copied = load_config(target / "config.yaml", [f"run.dir={target.parent}"])
    save_config(copied, target / "config.yaml")
    return copied, Run.of(copied)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the shared tiny run that the test may change."""
    return copy_run(tiny_run, tmp_path)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err

    @property
    def error(self) -> str:
        """The error message the CLI printed (stderr from "error:" on; libraries' progress bars precede it)."""
        return self.err[self.err.index("error:") :] if "error:" in self.err else ""


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `tuneship ARGS...` in-process as a person would: exit code, stdout, stderr (250 columns wide, so
    that tables do not wrap)."""
    from rich.console import Console

    from tuneship import cli as cli_module
    from tuneship.cli import main

    monkeypatch.setattr(cli_module, "console", Console(width=250))

    def run(*args) -> CliResult:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(exit_info.value.code or 0, captured.out, captured.err)

    return run
