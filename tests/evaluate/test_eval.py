"""The eval stage on a copy of the tiny run: report columns, held-out loss, gates."""

import json


def test_eval_writes_base_and_adapter_columns_and_held_out_loss(run_copy, cli):
    _, run = run_copy
    result = cli("eval", run.path)
    assert result.code == 0, result.output
    report = json.loads(run.eval_report.read_text())
    assert {"base", "adapter"} <= set(report["models"])  # export columns sit beside them
    assert [p["origin"] for p in report["prompts"]] == ["eval"] * 3 + ["train"] * 3
    assert all(len(m["answers"]) == 6 for m in report["models"].values())
    assert report["eval_loss"] > 0 and report["perplexity"] > 1 and report["eval_tokens"] > 0
    markdown = run.eval_report.with_suffix(".md").read_text()
    assert "| metric | base | adapter |" in markdown and "Question number" in markdown
    assert "recall_f1" in report["models"]["adapter"]["summary"]


def test_unmet_gate_exits_4_after_writing_the_report(run_copy, cli):
    _, run = run_copy
    run.eval_report.unlink()
    result = cli("eval", run.path, "--set", "eval.min_exact_match=1.0")
    assert result.code == 4
    assert "adapter: exact match 0.00 < eval.min_exact_match 1.0" in result.err
    assert run.eval_report.with_suffix(".md").is_file()
