"""The eval stage on a trained tiny run: report columns, held-out loss, gates."""

import json

import pytest

from tuneship.cli import main


def test_eval_writes_base_and_adapter_columns_and_held_out_loss(tiny_run, capsys):
    cfg, run_dir = tiny_run
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run_dir)])
    assert exit_info.value.code in (0, None), capsys.readouterr()
    report = json.loads((run_dir / "reports" / "eval.json").read_text())
    assert {"base", "adapter"} <= set(report["models"])  # export columns may sit beside them
    assert [p["origin"] for p in report["prompts"]] == ["eval"] * 3 + ["train"] * 3
    assert all(len(m["answers"]) == 6 for m in report["models"].values())
    assert report["eval_loss"] > 0 and report["perplexity"] > 1 and report["eval_tokens"] > 0
    markdown = (run_dir / "reports" / "eval.md").read_text()
    assert "| metric | base | adapter |" in markdown and "Question number" in markdown


def test_unmet_gate_exits_4_after_writing_the_report(tiny_run, capsys):
    _, run_dir = tiny_run
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run_dir), "--set", "eval.min_exact_match=1.0"])
    assert exit_info.value.code == 4
    assert "adapter: exact match 0.00 < eval.min_exact_match 1.0" in capsys.readouterr().err
    assert (run_dir / "reports" / "eval.md").is_file()
