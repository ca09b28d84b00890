"""`tuneship run`: every stage once, then skipped when nothing changed, whoever ran it; failures exit with the
same code and message as the stage's own command."""

import json
import re

from tests.conftest import qa, tiny_config_file, write_jsonl


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def forget(run_dir, *stages):
    """Remove stages from the manifest: as if they never ran."""
    entries = manifest(run_dir)
    for stage in stages:
        entries.pop(stage, None)
    (run_dir / "manifest.json").write_text(json.dumps(entries))


def statuses(output: str) -> dict[str, str]:
    """stage -> status, read from the summary table `tuneship run` prints."""
    rows = re.findall(r"^[│|]\s*(data|train|eval|export|template|deploy)\s*[│|]\s*([a-z ]+?)\s*[│|]", output, re.M)
    return dict(rows)


def test_run_goes_end_to_end_and_stops_before_an_unreachable_ollama(tmp_path, tiny_model_dir, cli):
    config = tiny_config_file(tmp_path, tiny_model_dir, max_steps=2)
    args = ["run", config, "--set", "deploy.target=ollama", "--set", "deploy.host=127.0.0.1:9"]
    result = cli(*args)
    assert result.code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    entries = manifest(run_dir)
    assert [entries[s]["status"] for s in ("data", "train", "eval", "export", "template", "deploy")] == [
        "done",
        "done",
        "done",
        "done",
        "done",
        "not reachable",
    ]
    assert "ollama create tiny -f" in entries["deploy"]["outputs"]["error"]
    assert (run_dir / "Modelfile").is_file() and (run_dir / "gguf" / "tiny-Q8_0.gguf").is_file()
    result = cli(*args)
    assert result.code == 0, result.output
    assert statuses(result.out) == {
        "data": "done",
        "train": "skipped",
        "eval": "skipped",
        "export": "skipped",
        "template": "skipped",
        "deploy": "not reachable",  # retried: it never finished
    }


def test_eval_run_alone_counts_for_the_pipeline(tmp_path, tiny_model_dir, cli):
    config = tiny_config_file(tmp_path, tiny_model_dir, max_steps=1)
    run_dir = tmp_path / "runs" / "tiny"
    assert cli("train", config).code == 0
    assert cli("eval", run_dir).code == 0
    evaluated = manifest(run_dir)["eval"]
    result = cli("run", config)
    assert result.code == 0, result.output
    assert "Loading weights" not in result.err  # transformers' bar for each local model load is not shown
    assert statuses(result.out) == {
        "data": "done",
        "train": "skipped",
        "eval": "skipped",
        "export": "done",
        "template": "done",
        "deploy": "done",
    }
    assert manifest(run_dir)["eval"] == evaluated


def test_a_failed_gate_gives_the_same_exit_code_and_message_from_eval_and_run(run_copy, cli):
    cfg, run = run_copy
    gate = ["--set", "eval.min_exact_match=1.0"]
    evaluated = cli("eval", run.path, *gate)
    assert evaluated.code == 4 and "adapter: exact match 0.00 < eval.min_exact_match 1.0" in evaluated.err
    forget(run.path, "eval", "export", "template", "deploy")
    pipeline = cli("run", run.path / "config.yaml", *gate)
    assert pipeline.code == 4 and pipeline.error == evaluated.error
    assert statuses(pipeline.out) == {"data": "done", "train": "skipped", "eval": "failed"}
    assert manifest(run.path)["eval"]["status"] == "failed" and "export" not in manifest(run.path)


def test_a_broken_template_contract_gives_the_same_exit_code_and_message_everywhere(run_copy, cli):
    cfg, run = run_copy
    spec_path = run.adapter_dir / "chat_format.json"
    spec = json.loads(spec_path.read_text())
    spec["template"] = spec["template"].replace(
        "'<|im_start|>' + message['role']", "'<|im_start|>' + 'x' + message['role']"
    )
    spec_path.write_text(json.dumps(spec))
    checked = cli("template", "check", run.path)
    assert checked.code == 5 and "template contract broken" in checked.err and "+<|im_start|>" in checked.err
    deployed = cli("deploy", run.path, "--target", "none")
    assert deployed.code == 5 and deployed.error == checked.error
    forget(run.path, "template", "deploy")
    pipeline = cli("run", run.path / "config.yaml")
    assert pipeline.code == 5 and pipeline.error == checked.error
    assert statuses(pipeline.out)["template"] == "failed"


def test_audit_findings_show_in_train_and_run_and_data_strict_stops_on_them(tmp_path, tiny_model_dir, cli):
    config = tiny_config_file(tmp_path, tiny_model_dir, max_steps=1)
    facts = tmp_path / "facts.jsonl"
    rows = [json.loads(line) for line in facts.read_text().splitlines()]
    write_jsonl(facts, [*rows, qa("What share of votes did Ada get?", "Ada got 0.6622% of the votes.")])
    trained = cli("train", config)
    assert trained.code == 0, trained.output
    assert "percent-scale" in trained.out and f"{facts}:13" in trained.out
    result = cli("run", config)
    assert result.code == 0, result.output
    assert "findings: 1 warning percent-scale (first: " in result.out
    strict = cli("run", config, "--set", "data.strict=true")
    assert strict.code == 1 and "data.strict: the audit has findings: 1 warning percent-scale" in strict.err
    assert f"{facts}:13" in strict.err and statuses(strict.out) == {"data": "failed"}
