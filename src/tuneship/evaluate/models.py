"""Load what a run produced: the base + adapter, with the ChatFormat saved beside it."""

from __future__ import annotations

import json
from pathlib import Path

from tuneship.errors import TuneshipError


def load_adapter_model(run_path: Path):
    """(PeftModel in eval mode, ChatFormat) from <run>/adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneship.chat.format import ChatFormat

    adapter = run_path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise TuneshipError(f"{run_path}: no trained adapter (adapter/adapter_config.json); run `tuneship train` first")
    chat_format = ChatFormat.load(adapter)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base)
    if chat_format.spec.is_pad_added:
        model.resize_token_embeddings(len(chat_format.tokenizer))
    return PeftModel.from_pretrained(model, adapter).eval(), chat_format
