"""Versions in adapter format (`loop.version_format: adapter`, the default): a version is its LoRA GGUF, applied
at run time on the base model's quantized GGUF, which every such version shares (base_gguf.py builds it once).
Its registry row names both: `gguf` the base's quantized GGUF (what llama.cpp loads), `adapter` the LoRA GGUF.

A cycle in this format does no merge, no f16 conversion of the model and no quantization: the challenger's export
converts its adapter (seconds) and checks it on the base quant. The champion the loop started from (v1, the base
run, exported merged) is brought into the same form when the loop first needs it (`in_adapter_form`): its adapter
is converted once, so the server loads one base for every version and a promotion only switches adapters.

A challenger in this format trains on the base as it serves (`served_base`: the base quant's weights, dequantized),
so that its learned check sees what llama.cpp will answer with; its adapter then names that folder as its base,
which leads to the same shared GGUFs (base_gguf.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tuneship.config import Config
from tuneship.loop.registry import Loop
from tuneship.loop.tables import Version
from tuneship.run import Run


def is_adapter_format(cfg: Config) -> bool:
    return cfg.loop.version_format == "adapter"


def served_base(cfg: Config) -> str:
    """The folder a challenger in adapter format trains on: the base model's deployed quant, dequantized (built
    once per base and quant; base_gguf.py raises ServedBaseUnavailable where transformers cannot read it)."""
    from tuneship.base_model import resolve_base_model
    from tuneship.base_gguf import served_base_dir

    return str(served_base_dir(resolve_base_model(cfg.model.base), Run.of(cfg).deployed_quant))


def adapter_files(cfg: Config, run_dir: Path) -> tuple[Path, Path]:
    """(the base's quantized GGUF, the run's LoRA GGUF) of a trained run, each made when missing."""
    from tuneship.base_gguf import base_gguf
    from tuneship.export.gguf import convert_lora_to_gguf
    from tuneship.models import adapter_base_dir

    run = Run.of(cfg, run_dir)
    base_dir = adapter_base_dir(run)
    if not run.lora_gguf.is_file():
        run.gguf_dir.mkdir(parents=True, exist_ok=True)
        convert_lora_to_gguf(run.adapter_dir, base_dir, run.lora_gguf)
    return base_gguf(base_dir, run.deployed_quant), run.lora_gguf


def in_adapter_form(loop: Loop, version: Version) -> Version:
    """A fine-tuned version registered with a merged GGUF only (v1, or one made in merged format) with its LoRA
    GGUF on the shared base added (an event says so), when the loop is in adapter format; else as it is."""
    if not is_adapter_format(loop.cfg) or version.adapter or version.kind != "finetune":
        return version
    base, lora = adapter_files(loop.version_config(version), Path(version.run_dir))
    loop.store.add_event(
        "adapter_form",
        "tuneship",
        f"v{version.id} now serves as its LoRA GGUF on the base model's {base.name} (loop.version_format=adapter); "
        f"its merged GGUF stays at {version.gguf}",
        {"gguf": str(base), "adapter": str(lora), "merged_gguf": version.gguf},
        version.id,
    )
    return loop.store.update_version(version.id, gguf=str(base), adapter=str(lora))


def drop_checkpoints(loop: Loop, version: Version) -> None:
    """A concluded fine-tuned version in adapter format keeps its adapter, LoRA GGUF and reports: its training
    checkpoints (only a crashed cycle resumes from them) go."""
    if is_adapter_format(loop.cfg) and version.kind == "finetune":
        shutil.rmtree(Path(version.run_dir) / "checkpoints", ignore_errors=True)
