"""The base model with a LoRA (or QLoRA) adapter, ready to train."""

from __future__ import annotations

import re
from pathlib import Path

from tuneship.errors import ModelError, TuneshipError


class QLoraUnavailable(TuneshipError):
    """QLoRA was asked for where it cannot run."""


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")  # a decoder layer's parameters, in every supported architecture


def load_for_training(base_dir: str, chat_format, lora_cfg, device, adapter_from: str | None = None):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from tuneship.models import load_base

    kwargs = {"dtype": getattr(torch, DTYPES[device.precision])}
    if lora_cfg.qlora:
        kwargs["quantization_config"] = _qlora_config(device)
    model = load_base(base_dir, chat_format, **kwargs)
    if lora_cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if adapter_from:  # the adapter it saves names the base it trained on, not the one `adapter_from` trained on
        model = PeftModel.from_pretrained(model, resolve_adapter(adapter_from), is_trainable=True)
        model.peft_config[model.active_adapter].base_model_name_or_path = base_dir
    else:
        config = LoraConfig(
            r=lora_cfg.r,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            target_modules=lora_cfg.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if device.kind != "cpu" and not lora_cfg.qlora:
        model.to(device.kind)
    return model


def freeze_lower_layers(model, train_layers: float) -> int:
    """train.train_layers: the LoRA weights of the layers below the top `train_layers` share stay as loaded; no
    gradient flows below the lowest trained layer, so the backward pass ends there. Their LoRA dropout is off too:
    it regularizes the weights it feeds, and these do not train, so it would only be noise, and without it their
    output for an example is the same at every step (train/frozen_layers.py keeps it). Returns the layers frozen."""
    import torch

    layers = model.get_base_model().config.get_text_config().num_hidden_layers
    frozen = layers - max(1, round(layers * train_layers))
    for name, module in model.named_modules():
        layer = LAYER_INDEX.search(name + ".")
        if not layer or int(layer.group(1)) >= frozen:
            continue
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(False)
        for adapter in getattr(module, "lora_dropout", {}):
            module.lora_dropout[adapter] = torch.nn.Identity()
    return frozen


def resolve_adapter(path: str) -> str:
    """A run folder or its adapter/ folder -> the adapter folder."""
    folder = Path(path)
    if (folder / "adapter" / "adapter_config.json").is_file():
        return str(folder / "adapter")
    if (folder / "adapter_config.json").is_file():
        return str(folder)
    raise ModelError(f"model.adapter_from={path}: no adapter_config.json there or in its adapter/ folder")


def _qlora_config(device):
    if device.kind != "cuda":
        raise QLoraUnavailable(
            f"lora.qlora=true needs a CUDA GPU (this run is on {device.kind}); "
            "set lora.qlora=false to train a plain LoRA"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QLoraUnavailable(
            "lora.qlora=true needs bitsandbytes: pip install bitsandbytes (or set lora.qlora=false)"
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, DTYPES[device.precision]),
    )


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
