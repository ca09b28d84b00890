"""Export of a tiny run through llama.cpp's converter and quantizer; validation catches broken files."""

import io
import json
import shutil

import pytest
from rich.console import Console

from tuneship.chat.format import ChatFormat
from tuneship.export.gguf import ExportError, convert_to_gguf, validate_gguf
from tuneship.export.stage import run_export


@pytest.fixture(scope="module")
def exported(tiny_run):
    """The tiny run exported with a KL limit no quant can meet, so the export gate's failure is seen too."""
    cfg, run_dir = tiny_run
    strict = cfg.model_copy(deep=True)
    strict.export.max_kl_divergence = 1e-9
    result = run_export(strict, run_dir, Console(file=io.StringIO()))
    return strict, run_dir, result


def test_export_writes_validated_ggufs_and_report_columns(exported):
    cfg, run_dir, result = exported
    names = sorted(p.name for p in (run_dir / "gguf").glob("*.gguf"))
    assert names == ["tiny-Q8_0.gguf", "tiny-f16.gguf"]
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
    q8 = next(info for info in result.ggufs if info["kind"] == "Q8_0")
    assert q8["tensor_types"].get("q8_0", 0) > 0 and q8["eos_token_id"] == 2
    assert set(result.timings) == {"merge", "convert", "quantize Q8_0", "faithfulness"}


def test_export_reports_kl_vs_f16_and_fails_a_quant_over_the_limit(exported):
    _, run_dir, result = exported
    q8 = result.faithfulness["Q8_0"]
    assert 0.0 < q8.kl_divergence and q8.positions > 0
    assert result.gate_failures == [
        f"gguf-Q8_0: KL vs f16 {q8.kl_divergence:.4f} > export.max_kl_divergence 1e-09 (top-1 agreement "
        f"{q8.top1_agreement:.3f}); use a larger quant (Q5_K_M, Q8_0) or raise the limit"
    ]
    summary = json.loads((run_dir / "reports" / "eval.json").read_text())["models"]["gguf-Q8_0"]["summary"]
    assert summary["kl_vs_f16"] == q8.kl_divergence and summary["top1_agreement"] == q8.top1_agreement
    markdown = (run_dir / "reports" / "eval.md").read_text()
    assert "| quant | KL vs f16 | top-1 agree | positions |" in markdown
    assert f"| gguf-Q8_0 | {q8.kl_divergence:.5f} | {q8.top1_agreement:.3f} | {q8.positions} |" in markdown


def test_tokenizer_whose_eos_differs_from_the_stop_token_fails_validation(exported, tmp_path):
    _, run_dir, _ = exported
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


def test_template_that_differs_from_the_run_fails_validation(exported, tmp_path):
    _, run_dir, _ = exported
    chat_format = ChatFormat.load(run_dir / "adapter")
    chat_format.spec.template = chat_format.spec.template.replace("system", "sys")
    with pytest.raises(ExportError, match="chat_template differs from the run's template"):
        validate_gguf(run_dir / "gguf" / "tiny-f16.gguf", "f16", chat_format)


def test_truncated_file_is_not_a_readable_gguf(exported, tmp_path):
    _, run_dir, _ = exported
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes((run_dir / "gguf" / "tiny-Q8_0.gguf").read_bytes()[:4096])
    with pytest.raises(ExportError, match="not a readable GGUF"):
        validate_gguf(damaged, "Q8_0", ChatFormat.load(run_dir / "adapter"))


def test_no_merge_exports_a_lora_gguf_checked_on_the_base_in_llama_cpp(tiny_run):
    cfg, run_dir = tiny_run
    result = run_export(cfg, run_dir, Console(file=io.StringIO()), merge=False)
    [info] = result.ggufs
    assert info["path"].endswith("tiny-lora-f16.gguf") and info["tensor_count"] > 0
    assert result.summaries["gguf-lora"]["prompts"] == 6
    assert (run_dir / "gguf" / "base-f16.gguf").is_file()
