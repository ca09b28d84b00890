"""The base model as GGUF (f16 and quantized), built once per base model and shared by everything that applies a
LoRA GGUF on it: `export.merge: false` runs and the loop's versions in adapter format (`loop.version_format`).

A version in adapter format is a few MB (its LoRA GGUF); what llama.cpp loads is the base's quantized GGUF, the
same file for every version, so a server loads it once and switches adapters. The files live in the cache
(`<cache>/base-gguf/<key>/`), keyed by the base folder and its weights' sizes and times, beside the base model
itself (the cache already holds it when the base came from a GGUF). Several processes may ask at once (a cycle
and the server): one builds under a file lock, each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tuneship.disk import locked, written_atomically
from tuneship.paths import cache_dir

REFERENCE_KIND = "f16"


def base_gguf(base_dir: str | Path, kind: str) -> Path:
    """The base model in `base_dir` as `<kind>` GGUF (f16, or a quant made from the f16), built when missing."""
    from tuneship.export import gguf

    folder = cache_dir() / "base-gguf" / base_key(Path(base_dir))
    path = folder / f"base-{kind}.gguf"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):
        reference = folder / f"base-{REFERENCE_KIND}.gguf"
        if not reference.is_file():
            with written_atomically(reference) as partial:
                gguf.convert_to_gguf(Path(base_dir), partial, REFERENCE_KIND)
        if not path.is_file():
            with written_atomically(path) as partial:
                gguf.quantize(reference, partial, kind)
    return path


def base_key(base_dir: Path) -> str:
    """The base folder's identity: its path and its weight files' names, sizes and modification times."""
    digest = hashlib.sha256(str(base_dir.resolve()).encode())
    for weights in sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
