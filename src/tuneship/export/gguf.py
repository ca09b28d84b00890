"""GGUF conversion (llama.cpp's converter), quantization (llama.cpp), and validation of every file."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.errors import TuneshipError
from tuneship.export.converter import RunningScript, run_script, run_script_here, start_script
from tuneship.disk import require_disk_for_file

QUANT_FTYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
}
# Plausible tensor bytes per parameter (metadata such as the vocabulary is not counted). Wide on purpose:
# narrow models keep many tensors at q5_0/q8_0 (576 columns is not a multiple of 256) and small models
# are dominated by the embedding table.
BYTES_PER_PARAMETER = {
    "f32": (3.8, 4.3),
    "f16": (1.9, 2.3),
    "bf16": (1.9, 2.3),
    "Q8_0": (1.0, 1.3),
    "Q6_K": (0.75, 1.3),
    "Q5_K_M": (0.6, 1.3),
    "Q4_K_M": (0.5, 1.3),
    "Q4_K_S": (0.5, 1.3),
}


class ExportError(TuneshipError):
    """Conversion, quantization or validation of a GGUF failed."""


@dataclass
class GGUFInfo:
    path: str
    kind: str
    size_bytes: int
    tensor_bytes: int
    parameters: int
    architecture: str
    tensor_count: int
    tensor_types: dict[str, int]
    eos_token_id: int | None
    eot_token_id: int | None
    chat_template: str | None
    problems: list[str] = field(default_factory=list)


def convert_to_gguf(merged_dir: Path, out_path: Path, outtype: str) -> Path:
    return start_conversion(merged_dir, out_path, outtype).result()


@dataclass
class PendingConversion:
    """llama.cpp's converter at work in its own process (export checks the merged model meanwhile)."""

    merged_dir: Path
    out_path: Path
    script: RunningScript

    def __enter__(self) -> PendingConversion:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:  # the work it was started alongside failed: stop it
            self.script.process.kill()
            self.script.wait()

    def result(self) -> Path:
        return _require_output(self.script.wait(), "converter", self.merged_dir, self.out_path)


def start_conversion(merged_dir: Path, out_path: Path, outtype: str) -> PendingConversion:
    """The whole model's conversion, always in its own process: the memory it takes goes back when it ends, even
    in a long-lived server or standby process."""
    size = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    require_disk_for_file(out_path.parent, size // (2 if outtype != "f32" else 1), f"the {outtype} GGUF")
    arguments = [str(merged_dir), "--outfile", str(out_path), "--outtype", outtype]
    return PendingConversion(merged_dir, out_path, start_script("convert_hf_to_gguf.py", arguments))


def convert_lora_to_gguf(adapter_dir: Path, base_dir: str, out_path: Path) -> Path:
    """llama.cpp's LoRA converter: in this process when it has torch imported already (a training process: the
    import is most of the converter's time), else in its own."""
    arguments = [str(adapter_dir), "--base", base_dir, "--outfile", str(out_path), "--outtype", "f16"]
    run = run_script_here if "torch" in sys.modules else run_script
    return _require_output(run("convert_lora_to_gguf.py", arguments), "LoRA converter", adapter_dir, out_path)


def _require_output(finished: subprocess.CompletedProcess, converter: str, source: Path, out_path: Path) -> Path:
    if finished.returncode != 0 or not out_path.is_file():
        raise ExportError(f"llama.cpp's {converter} failed on {source}:\n{finished.stderr[-2000:]}")
    return out_path


def quantize(source: Path, out_path: Path, quant: str) -> Path:
    import llama_cpp

    require_disk_for_file(out_path.parent, source.stat().st_size // 2, f"the {quant} GGUF")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    log = out_path.with_suffix(".log")
    with native_output_to(log):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out_path).encode(), ctypes.byref(params))
    if status != 0 or not out_path.is_file():
        raise ExportError(f"llama.cpp could not quantize {source} to {quant} (status {status}); see {log}")
    return out_path


@contextmanager
def native_output_to(path: Path):
    """Send what C code prints (llama.cpp logs every tensor) to a file instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def read_gguf(path: Path, kind: str) -> GGUFInfo:
    from tuneship.gguf_header import GGUFHeaderError, read_header

    try:
        header = read_header(path)
    except GGUFHeaderError as exc:
        raise ExportError(f"{path}: not a readable GGUF ({exc})") from None
    value = header.metadata.get
    return GGUFInfo(
        path=str(path),
        kind=kind,
        size_bytes=path.stat().st_size,
        tensor_bytes=sum(t.n_bytes for t in header.tensors),
        parameters=sum(t.n_elements for t in header.tensors),
        architecture=value("general.architecture") or "",
        tensor_count=len(header.tensors),
        tensor_types=dict(Counter(t.type_name for t in header.tensors).most_common()),
        eos_token_id=value("tokenizer.ggml.eos_token_id"),
        eot_token_id=value("tokenizer.ggml.eot_token_id"),
        chat_template=value("tokenizer.chat_template"),
    )


def validate_gguf(path: Path, kind: str, chat_format, expected_tensors: int | None = None) -> GGUFInfo:
    """Raise ExportError, showing both values, when the file does not match the run."""
    info = read_gguf(path, kind)
    spec = chat_format.spec
    if not info.architecture:
        info.problems.append("no general.architecture")
    if info.chat_template != spec.template:
        info.problems.append(
            f"tokenizer.chat_template differs from the run's template:\n    gguf: "
            f"{(info.chat_template or '<none>')[:300]!r}\n    run:  {spec.template[:300]!r}"
        )
    if spec.stop_token_ids[0] not in (info.eos_token_id, info.eot_token_id):
        info.problems.append(
            f"tokenizer.ggml.eos_token_id is {info.eos_token_id} (eot {info.eot_token_id}) but the "
            f"run stops on "
            f"{spec.stop_token!r} (id {spec.stop_token_ids[0]}): the model would not stop"
        )
    if expected_tensors is not None and info.tensor_count != expected_tensors:
        info.problems.append(f"{info.tensor_count} tensors, the f16 export has {expected_tensors}")
    low, high = BYTES_PER_PARAMETER.get(kind, (0.3, 4.5))
    ratio = info.tensor_bytes / max(info.parameters, 1)
    if not low <= ratio <= high:
        info.problems.append(
            f"{info.tensor_bytes / 1e6:.1f} MB of tensors for {info.parameters / 1e6:.1f}M parameters "
            f"({ratio:.2f} bytes each) is implausible for {kind} (expected {low}-{high})"
        )
    if info.size_bytes < info.tensor_bytes:
        info.problems.append(f"the file ({info.size_bytes} bytes) is smaller than its tensors ({info.tensor_bytes})")
    if info.problems:
        raise ExportError(f"{path} failed validation:\n  " + "\n  ".join(info.problems))
    return info
