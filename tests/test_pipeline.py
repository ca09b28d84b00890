"""`tuneship run`: every stage once, then skipped when nothing changed."""

import json

import pytest

from tests.conftest import tiny_config_file
from tuneship.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out + captured.err


def test_run_goes_end_to_end_and_stops_before_an_unreachable_ollama(tmp_path, tiny_model_dir, capsys):
    config = tiny_config_file(tmp_path, tiny_model_dir, max_steps=2)
    args = ["run", str(config), "--set", "deploy.host=127.0.0.1:9"]
    code, out = run_cli(args, capsys)
    assert code == 0, out
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert [manifest[s]["status"] for s in ("data", "train", "eval", "export", "template", "deploy")] == [
        "done",
        "done",
        "done",
        "done",
        "done",
        "not reachable",
    ]
    assert "ollama create tiny -f" in manifest["deploy"]["outputs"]["detail"]
    assert (tmp_path / "runs" / "tiny" / "Modelfile").is_file()
    assert (tmp_path / "runs" / "tiny" / "gguf" / "tiny-Q8_0.gguf").is_file()
    code, out = run_cli(args, capsys)
    assert code == 0 and out.count("skipped") == 4, out  # train, eval, export, template; deploy is retried


def test_run_stops_at_a_failed_gate_and_exits_non_zero(tmp_path, tiny_model_dir, capsys):
    config = tiny_config_file(tmp_path, tiny_model_dir, max_steps=1)
    code, out = run_cli(["run", str(config), "--set", "eval.min_exact_match=1.0"], capsys)
    assert code == 1 and "evaluation gates not met" in out
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert "export" not in manifest
