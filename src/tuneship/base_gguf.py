"""The base model as GGUF (f16 and quantized), built once per base model and shared by everything that applies a
LoRA GGUF on it: `export.merge: false` runs and the loop's versions in adapter format (`loop.version_format`).

A version in adapter format is a few MB (its LoRA GGUF); what llama.cpp loads is the base's quantized GGUF, the
same file for every version, so a server loads it once and switches adapters. The files live in the cache
(`<cache>/base-gguf/<key>/`), keyed by the base folder and its weights' sizes and times, beside the base model
itself (the cache already holds it when the base came from a GGUF). Several processes may ask at once (a cycle
and the server): one builds under a file lock, each file is written under a temporary name and renamed.

An adapter that serves on the base's quant can train on the base as it serves (`model.train_on_quant`, which the
loop's cycles in adapter format set; `served_base_dir`): the quantized GGUF's weights dequantized into an HF folder
beside it (`hf-<kind>/`, with the base's own config and tokenizer files), so that the check that stops training
when the examples are learned measures the weights llama.cpp answers with. On SmolLM2
the Q4_K_M's weights differ from the base's by 4-6 % (mean, relative) in most projections, enough to flip
a fact learned by a 1-logit margin on the base. Such a folder names its base (SERVED_MARK), so an adapter trained on
it finds the same shared GGUFs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuneship.disk import HEADROOM, free_disk_bytes, locked, written_atomically
from tuneship.errors import TuneshipError
from tuneship.paths import cache_dir

REFERENCE_KIND = "f16"
UNQUANTIZED = {"f16", "bf16", "f32"}
SERVED_MARK = "served-base.json"
BASE_RECORD = "base.json"


class ServedBaseUnavailable(TuneshipError):
    """The base cannot be had as it serves: transformers cannot dequantize its quantized GGUF (its architecture or
    quant type), or the cache's disk has no room for it."""


def base_gguf(base_dir: str | Path, kind: str) -> Path:
    """The base model in `base_dir` as `<kind>` GGUF (f16, or a quant made from the f16), built when missing."""
    from tuneship.export import gguf

    folder = _gguf_folder(Path(base_dir))
    path = folder / f"base-{kind}.gguf"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):
        _record_base(folder, Path(base_dir))
        reference = folder / f"base-{REFERENCE_KIND}.gguf"
        if not reference.is_file():
            with written_atomically(reference) as partial:
                gguf.convert_to_gguf(Path(base_dir), partial, REFERENCE_KIND)
        if not path.is_file():
            with written_atomically(path) as partial:
                gguf.quantize(reference, partial, kind)
    return path


def _record_base(folder: Path, base_dir: Path) -> None:
    """Which base the folder's files are made from (BASE_RECORD), for a person looking through the cache (its names
    are hashes) and for cleaning up after bases that are gone."""
    record = folder / BASE_RECORD
    if not record.is_file() and not (base_dir / SERVED_MARK).is_file():
        record.write_text(json.dumps({"base": str(base_dir.resolve())}) + "\n")


def served_base_dir(base_dir: str | Path, kind: str) -> Path:
    """The base model in `base_dir` as llama.cpp serves it as `<kind>`: an HF folder of that GGUF's weights,
    dequantized, built when missing (7 s for SmolLM2 on 2 cores). An unquantized kind is the base itself."""
    from tuneship.base_model import dequantize_gguf

    base_dir = Path(base_dir)
    if (base_dir / SERVED_MARK).is_file():  # already a served base: the same one, or its base's other quant
        mark = json.loads((base_dir / SERVED_MARK).read_text())
        if mark["kind"] == kind:
            return base_dir
        base_dir = Path(mark["base"])
    if kind in UNQUANTIZED:
        return base_dir
    quantized = base_gguf(base_dir, kind)
    target = quantized.parent / f"hf-{kind}"
    if (target / SERVED_MARK).is_file():  # made before: no lock to wait for (a cycle asks at each training)
        return target
    with locked(quantized.parent / ".hf.lock"):
        if not (target / SERVED_MARK).is_file():
            _require_room(base_dir, target, kind)
            try:
                dequantize_gguf(quantized, target, files_from=base_dir)
            except (ValueError, NotImplementedError, KeyError) as exc:
                raise ServedBaseUnavailable(
                    f"model.train_on_quant={kind}: transformers cannot dequantize {quantized} ({exc}); "
                    "without model.train_on_quant the adapter trains on the base's own weights"
                ) from None
            mark = {"base": str(base_dir.resolve()), "kind": kind}
            (target / SERVED_MARK).write_text(json.dumps(mark) + "\n")
    return target


def _require_room(base_dir: Path, target: Path, kind: str) -> None:
    """The base as it serves takes what the base's weights take (it is stored in their dtype): about 14 GB for a 7B
    base in bf16. Refused before writing any of it when the cache's disk has less free."""
    needed = int(sum(weights.stat().st_size for weights in _weight_files(base_dir)) * HEADROOM)
    free = free_disk_bytes(target.parent)
    if free < needed:
        raise ServedBaseUnavailable(
            f"model.train_on_quant={kind}: {target} needs {needed / 1e9:.2f} GB (the base's weights) and "
            f"{free / 1e9:.2f} GB are free there; free space on that disk or point TUNESHIP_CACHE at a larger one"
        )


def _gguf_folder(base_dir: Path) -> Path:
    """Where the base's GGUFs are: a served base's are its base's (the folder it lies in)."""
    if (base_dir / SERVED_MARK).is_file():
        return base_dir.parent
    return cache_dir() / "base-gguf" / base_key(base_dir)


def base_key(base_dir: Path) -> str:
    """The base folder's identity: its path and its weight files' names, sizes and modification times."""
    digest = hashlib.sha256(str(base_dir.resolve()).encode())
    for weights in _weight_files(base_dir):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _weight_files(base_dir: Path) -> list[Path]:
    return sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("*.bin"))
