"""Export timings and sizes for a trained run, and our overhead vs llama.cpp's tools run directly.

Usage: python benchmarks/export.py RUN_DIR [--quant Q4_K_M]
RUN_DIR is a trained run (e.g. runs/quickstart after `tuneship train examples/quickstart.yaml`).
Prints merge, convert and quantize seconds and file sizes, then the same convert + quantize done by
running llama.cpp's convert_hf_to_gguf.py and llama_model_quantize directly on the same merged
folder. The ratio should be ~1.0: tuneship adds validation afterwards, not overhead inside.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tuneship.config import load_config
from tuneship.export.converter import ensure_converter
from tuneship.export.gguf import QUANT_FTYPES, convert_to_gguf, quantize
from tuneship.export.merge import merge_adapter
from tuneship.run import Run


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def direct(merged: Path, workdir: Path, quant: str) -> tuple[float, float]:
    import llama_cpp

    folder = ensure_converter()
    f16 = workdir / "direct-f16.gguf"
    env = {**os.environ, "PYTHONPATH": str(folder / "gguf-py")}
    _, convert_s = timed(
        lambda: subprocess.run(
            [
                sys.executable,
                str(folder / "convert_hf_to_gguf.py"),
                str(merged),
                "--outfile",
                str(f16),
                "--outtype",
                "f16",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    _, quant_s = timed(
        lambda: llama_cpp.llama_model_quantize(
            str(f16).encode(), str(workdir / f"direct-{quant}.gguf").encode(), ctypes.byref(params)
        )
    )
    return convert_s, quant_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--quant", default="Q4_K_M", choices=sorted(QUANT_FTYPES))
    args = parser.parse_args()
    run = Run.of(load_config(args.run_dir / "config.yaml"), args.run_dir)
    merged, merge_s = timed(lambda: merge_adapter(run, was_qlora=False, console=Console(stderr=True)))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        f16, convert_s = timed(lambda: convert_to_gguf(merged, workdir / "ours-f16.gguf", "f16"))
        quantized, quant_s = timed(lambda: quantize(f16, workdir / f"ours-{args.quant}.gguf", args.quant))
        sizes = {p.name: p.stat().st_size / 1e6 for p in (f16, quantized)}
        direct_convert_s, direct_quant_s = direct(merged, workdir, args.quant)
    merged_mb = sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 1e6
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"merge: {merge_s:.1f} s -> {merged_mb:.1f} MB safetensors")
    print(f"convert f16: {convert_s:.1f} s -> {sizes['ours-f16.gguf']:.1f} MB")
    print(f"quantize {args.quant}: {quant_s:.1f} s -> {sizes[f'ours-{args.quant}.gguf']:.1f} MB")
    ours, theirs = convert_s + quant_s, direct_convert_s + direct_quant_s
    print(f"convert+quantize: tuneship {ours:.1f} s, llama.cpp directly {theirs:.1f} s, ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
