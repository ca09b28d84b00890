"""Export of a tiny run through llama.cpp's converter and quantizer; validation catches broken files."""

import sys
import io
import json
import shutil

import pytest
from rich.console import Console

from tuneship.chat.format import ChatFormat
from tuneship.errors import GateFailed
from tuneship.export.gguf import ExportError, convert_to_gguf, validate_gguf
from tuneship.export.stage import run_export


def test_export_writes_validated_ggufs_and_report_columns(tiny_run):
    cfg, run = tiny_run
    run_dir = run.path
    names = sorted(p.name for p in (run_dir / "gguf").glob("*.gguf"))
    assert names == ["tiny-Q8_0.gguf", "tiny-f16.gguf"]
    assert run.model_ggufs() == [run.gguf("Q8_0"), run.gguf("f16")]
    merged = run_dir / "merged"
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_format.json",
    } <= {p.name for p in merged.iterdir()}
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [2]
    report = json.loads((run_dir / "reports" / "eval.json").read_text())
    assert {"merged", "gguf-f16", "gguf-Q8_0"} <= set(report["models"])
    assert report["models"]["gguf-f16"]["summary"]["prompt_token_mismatches"] == 0
    export = json.loads((run_dir / "gguf" / "export.json").read_text())
    q8 = next(info for info in export["files"] if info["kind"] == "Q8_0")
    assert q8["tensor_types"].get("q8_0", 0) > 0 and q8["eos_token_id"] == 2
    assert set(export["timings"]) == {"merge", "convert", "quantize Q8_0", "faithfulness"}
    q8_summary = report["models"]["gguf-Q8_0"]["summary"]
    assert 0.0 <= q8_summary["kl_vs_f16"] <= cfg.export.max_kl_divergence and q8_summary["kl_positions"] > 0


def test_export_reports_kl_vs_f16_and_fails_a_quant_over_the_limit(run_copy):
    cfg, run = run_copy
    cfg.export.max_kl_divergence = 1e-12
    with pytest.raises(GateFailed) as failed:
        run_export(cfg, run, Console(file=io.StringIO()))
    summary = json.loads(run.eval_report.read_text())["models"]["gguf-Q8_0"]["summary"]
    kl, agreement, positions = summary["kl_vs_f16"], summary["top1_agreement"], summary["kl_positions"]
    assert 0.0 < kl and positions > 0
    assert (
        f"gguf-Q8_0: KL vs f16 {kl:.4f} > export.max_kl_divergence 1e-12 (top-1 agreement {agreement:.3f}); "
        "use a larger quant (Q5_K_M, Q8_0) or raise the limit"
    ) in str(failed.value)
    markdown = run.eval_report.with_suffix(".md").read_text()
    assert "| quant | KL vs f16 | top-1 agree | positions |" in markdown
    assert f"| gguf-Q8_0 | {kl:.5f} | {agreement:.3f} | {positions} |" in markdown


def test_tokenizer_whose_eos_differs_from_the_stop_token_fails_validation(tiny_run, tmp_path):
    run_dir = tiny_run[1].path
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "merged", broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((broken / "generation_config.json").read_text())
    generation["eos_token_id"] = 0
    (broken / "generation_config.json").write_text(json.dumps(generation))
    gguf = convert_to_gguf(broken, tmp_path / "broken-f16.gguf", "f16")
    chat_format = ChatFormat.load(run_dir / "adapter")
    with pytest.raises(ExportError, match=r"eos_token_id is 0 .* stops on '<\|im_end\|>' \(id 2\)"):
        validate_gguf(gguf, "f16", chat_format)


def test_template_that_differs_from_the_run_fails_validation(tiny_run, tmp_path):
    run_dir = tiny_run[1].path
    chat_format = ChatFormat.load(run_dir / "adapter")
    chat_format.spec.template = chat_format.spec.template.replace("system", "sys")
    with pytest.raises(ExportError, match="chat_template differs from the run's template"):
        validate_gguf(run_dir / "gguf" / "tiny-f16.gguf", "f16", chat_format)


def test_truncated_file_is_not_a_readable_gguf(tiny_run, tmp_path):
    run_dir = tiny_run[1].path
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes((run_dir / "gguf" / "tiny-Q8_0.gguf").read_bytes()[:4096])
    with pytest.raises(ExportError, match="not a readable GGUF"):
        validate_gguf(damaged, "Q8_0", ChatFormat.load(run_dir / "adapter"))


def test_no_merge_exports_a_lora_gguf_checked_on_the_quantized_base_that_the_template_check_never_takes(run_copy, cli):
    from tuneship.base_gguf import base_gguf
    from tuneship.models import adapter_base_dir

    _, run = run_copy
    shutil.rmtree(run.gguf_dir)  # a run that was never exported merged
    exported = cli("export", run.path, "--no-merge")
    assert exported.code == 0, exported.output
    [info] = json.loads((run.gguf_dir / "export.json").read_text())["files"]
    assert info["path"] == str(run.lora_gguf) and info["tensor_count"] > 0
    report = json.loads(run.eval_report.read_text())
    served = report["models"][f"gguf-lora-{run.deployed_quant}"]["summary"]  # what serves: LoRA on the base quant
    assert served["prompts"] == 6 and "gguf-lora-f16" not in report["models"]  # the f16 base only scores it
    assert served["kl_vs_f16"] >= 0 and 0 < served["top1_agreement"] <= 1 and served["kl_positions"] > 0
    assert base_gguf(adapter_base_dir(run), run.deployed_quant).is_file() and run.model_ggufs() == []
    checked = cli("template", "check", run.path)
    assert checked.code == 0, checked.output
    assert "gguf: none exported yet" in checked.out and "lora" not in checked.output


def test_the_converter_running_alongside_failed_work_is_stopped(tiny_run, tmp_path):
    from tuneship.export.gguf import start_conversion

    run_dir = tiny_run[1].path
    with pytest.raises(RuntimeError, match="the merged model's check failed"):
        with start_conversion(run_dir / "merged", tmp_path / "never.gguf", "f16") as conversion:
            raise RuntimeError("the merged model's check failed")
    assert conversion.script.process.returncode is not None  # killed and reaped, not left running


def test_a_failing_conversion_says_what_the_converter_said(tmp_path):
    from tuneship.export.gguf import start_conversion

    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="llama.cpp's converter failed on .*\n(.|\n)*(Error|error)"):
        start_conversion(tmp_path, tmp_path / "out.gguf", "f16").result()


def test_the_lora_converter_in_this_process_writes_the_same_file_and_leaves_this_processs_gguf_alone(
    tiny_run, tmp_path
):
    import gguf
    import torch  # noqa: F401 - a training process has it: the converter then runs here

    from tuneship.export.converter import run_script, run_script_here
    from tuneship.models import adapter_base_dir

    _, run = tiny_run
    arguments = [str(run.adapter_dir), "--base", adapter_base_dir(run), "--outtype", "f16", "--outfile"]
    here = run_script_here("convert_lora_to_gguf.py", [*arguments, str(tmp_path / "here.gguf")])
    apart = run_script("convert_lora_to_gguf.py", [*arguments, str(tmp_path / "apart.gguf")])
    assert here.returncode == apart.returncode == 0, here.stderr
    assert (tmp_path / "here.gguf").read_bytes() == (tmp_path / "apart.gguf").read_bytes()
    assert sys.modules["gguf"] is gguf and "conversion" not in sys.modules
    failed = run_script_here("convert_lora_to_gguf.py", ["/no/such/adapter", "--outfile", str(tmp_path / "x.gguf")])
    assert failed.returncode != 0 and not (tmp_path / "x.gguf").exists() and sys.modules["gguf"] is gguf
