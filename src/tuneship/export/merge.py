"""Merge the LoRA adapter into its base and save what LM Studio and llama.cpp need beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneship.export.disk import require_disk


def merge_adapter(run_path: Path, *, was_qlora: bool, console) -> Path:
    """<run>/merged: safetensors, config, generation_config and tokenizer files with the run's template.

    The base is always reloaded unquantized (fp32 on CPU, fp16 on CUDA): merging into a 4-bit base
    would round the adapter away.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneship.chat.format import ChatFormat

    adapter = run_path / "adapter"
    chat_format = ChatFormat.load(adapter)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if was_qlora:
        console.print("the adapter was trained on a 4-bit base; merging into the base reloaded in 16-bit instead")
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if chat_format.spec.is_pad_added:
        model.resize_token_embeddings(len(chat_format.tokenizer))
    merged_dir = run_path / "merged"
    require_disk(merged_dir, _parameter_bytes(model), "the merged model")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.config.pad_token_id = chat_format.spec.pad_token_id
    merged.config.eos_token_id = chat_format.spec.stop_token_ids[0]
    merged.generation_config.eos_token_id = chat_format.spec.stop_token_ids
    merged.generation_config.pad_token_id = chat_format.spec.pad_token_id
    merged.save_pretrained(merged_dir, safe_serialization=True)
    chat_format.save(merged_dir)
    for license_file in Path(base).glob("LICENSE*") if Path(base).is_dir() else []:
        shutil.copy2(license_file, merged_dir / license_file.name)
    return merged_dir


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
