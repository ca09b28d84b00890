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


def test_eval_generates_in_the_precision_training_computed_in(run_copy, monkeypatch):
    """bf16 weights, adapter included, where training ran in bf16 on this CPU; the checkpoint's dtype otherwise."""
    import torch

    from tuneship.config import load_config
    from tuneship.evaluate.stage import generation_precision
    from tuneship.models import load_adapted

    _, run = run_copy
    cfg_path = run.path / "config.yaml"
    monkeypatch.setattr("tuneship.train.precision.cpu_auto_precision", lambda: ("bf16", "measured bf16 fast"))
    bf16 = generation_precision(load_config(cfg_path, ["train.device=cpu", "train.precision=auto"]))
    assert bf16 == {"dtype": torch.bfloat16, "adapter_in_base_dtype": True}
    model, _ = load_adapted(run, **bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for fp32 in (["train.precision=fp32"], ["train.precision=auto"]):
        monkeypatch.setattr("tuneship.train.precision.cpu_auto_precision", lambda: ("fp32", "measured bf16 slow"))
        assert generation_precision(load_config(cfg_path, ["train.device=cpu", *fp32])) == {}
    model, _ = load_adapted(run)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
