"""The CLI as a person runs it: exit codes, outputs, start-up time."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO, qa, write_jsonl


def test_data_check_usable_data_exits_zero_and_writes_everything(tmp_path, cli):
    data = write_jsonl(tmp_path / "d.jsonl", [qa("Q1", "A1"), qa("Q2", "A2"), "{broken"])
    result = cli("data", "check", data, "--out", tmp_path / "out")
    assert result.code == 0 and "3 read = 2 kept + 1 dropped" in result.out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "train.jsonl",
        "eval.jsonl",
        "dropped.jsonl",
        "audit.json",
        "audit.md",
    }


def test_data_check_strict_fails_on_any_finding(tmp_path, cli):
    data = write_jsonl(tmp_path / "d.jsonl", [qa("Q1", "A1"), "{broken"])
    result = cli("data", "check", data, "--strict")
    assert result.code == 1 and "data.strict: the audit has findings: 1 error malformed-json" in result.err


def test_data_check_nothing_usable_fails(tmp_path, cli):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "completion": "x"}])
    result = cli("data", "check", data)
    assert result.code == 1 and "no usable training examples" in result.err


def test_data_check_json_output_is_machine_readable(tmp_path, cli):
    data = write_jsonl(tmp_path / "d.jsonl", [qa("Q1", "A1"), qa("Q1", "A1")])
    result = cli("data", "check", data, "--json")
    report = json.loads(result.out)
    assert result.code == 0 and report["counts"] == {"duplicate": {"error": 1, "warning": 0}}


def test_errors_print_without_traceback_and_exit_non_zero(tmp_path, cli):
    result = cli("data", "check", tmp_path / "missing.jsonl")
    assert result.code == 1 and "no such file or folder" in result.err and "Traceback" not in result.err


def test_config_error_exit_code(tmp_path, cli):
    result = cli("data", "check", "x.jsonl", "--set", "train.learning_rate=7")
    assert result.code == 2 and "train.learning_rate" in result.err


def test_help_and_data_check_start_fast(tmp_path):
    """Heavy libraries stay unimported: a fresh interpreter runs --help without torch/transformers."""
    data = write_jsonl(tmp_path / "d.jsonl", [qa("Q1", "A1")])
    code = (
        "import sys, runpy; sys.argv = ['tuneship', 'data', 'check', %r]\n"
        "from tuneship.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'pyarrow', 'boto3') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    ) % str(data)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, cwd=REPO)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
