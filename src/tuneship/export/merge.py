"""Merge the LoRA adapter into its base and save what LM Studio and llama.cpp need beside it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.disk import require_disk_for_file

if TYPE_CHECKING:
    from rich.console import Console

    from tuneship.run import Run


def merge_adapter(run: Run, *, was_qlora: bool, console: Console) -> Path:
    """<run>/merged: safetensors, config, generation_config and tokenizer files with the run's template.

    The base is always reloaded unquantized (fp32 on CPU, fp16 on CUDA): merging into a 4-bit base
    would round the adapter away.
    """
    import torch

    from tuneship.models import adapter_base_dir, load_adapted

    if was_qlora:
        console.print("the adapter was trained on a 4-bit base; merging into the base reloaded in 16-bit instead")
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    model, chat_format = load_adapted(run, dtype=dtype)
    require_disk_for_file(run.merged_dir, _parameter_bytes(model.get_base_model()), "the merged model")
    merged = model.merge_and_unload()
    merged.save_pretrained(run.merged_dir, safe_serialization=True)
    chat_format.save(run.merged_dir)
    base = Path(adapter_base_dir(run))
    for license_file in base.glob("LICENSE*") if base.is_dir() else []:
        shutil.copy2(license_file, run.merged_dir / license_file.name)
    return run.merged_dir


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
