"""The one place that loads a model for a run, and gives it the ChatFormat's pad and eos rules.

Train loads the base, eval loads the base with the run's adapter, export merges that and checks the
merged folder: all of them get the same embedding size (a pad token the format added) and the same
pad/eos ids in `config` and `generation_config` (eos = every stop token id, so generation stops on them).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tuneship.errors import ModelError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from tuneship.chat.format import ChatFormat
    from tuneship.config import Config
    from tuneship.run import Run


def base_chat_format(cfg: Config) -> ChatFormat:
    """The ChatFormat a run trains with, built from the base model's tokenizer and `chat:` settings."""
    from tuneship.base_model import resolve_base_model
    from tuneship.chat.format import ChatFormat

    return ChatFormat.from_model_dir(resolve_base_model(cfg.model.base, weights=False), cfg.chat)


def require_adapter(run: Run) -> None:
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{run.path}: no trained adapter (adapter/adapter_config.json); run `tuneship train` first")


def trained_chat_format(run: Run) -> ChatFormat:
    """The ChatFormat saved with the adapter: what the run was trained with."""
    from tuneship.chat.format import ChatFormat

    require_adapter(run)
    return ChatFormat.load(run.adapter_dir)


def apply_chat_format(model: PreTrainedModel, chat_format: ChatFormat) -> None:
    spec = chat_format.spec
    model.config.pad_token_id = spec.pad_token_id
    model.config.eos_token_id = spec.stop_token_ids[0]
    model.generation_config.pad_token_id = spec.pad_token_id
    model.generation_config.eos_token_id = spec.stop_token_ids


def load_base(base_dir: str, chat_format: ChatFormat, **from_pretrained: Any) -> PreTrainedModel:
    """The base model (dtype, quantization_config... passed on), sized and configured for the format."""
    from transformers import AutoModelForCausalLM

    try:
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(base_dir, **from_pretrained)
    except OSError as exc:
        raise ModelError(f"cannot load the base model from {base_dir}: {exc}") from None
    if chat_format.spec.is_pad_added:
        model.resize_token_embeddings(len(chat_format.tokenizer))
    apply_chat_format(model, chat_format)
    return model


@contextmanager
def _no_loading_bar():
    """transformers draws a "Loading weights" bar on stderr for every load of a local folder: noise in
    tuneship's output, and in every log a cycle or a test keeps."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def adapter_base_dir(run: Run) -> str:
    """The base folder the adapter was trained on (as resolved at training time)."""
    require_adapter(run)
    return json.loads((run.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_adapted(
    run: Run, *, adapter_in_base_dtype: bool = False, **from_pretrained: Any
) -> tuple[PeftModel, ChatFormat]:
    """(the base with the run's adapter, in eval mode; the run's ChatFormat). The adapter's weights stay fp32
    (PEFT's default) unless `adapter_in_base_dtype`: then they take the base's dtype, as autocast computed
    them in training."""
    from peft import PeftModel

    chat_format = trained_chat_format(run)
    base = load_base(adapter_base_dir(run), chat_format, **from_pretrained)
    model = PeftModel.from_pretrained(base, run.adapter_dir, autocast_adapter_dtype=not adapter_in_base_dtype)
    return model.eval(), chat_format


def load_merged(run: Run, chat_format: ChatFormat, **from_pretrained: Any) -> PreTrainedModel:
    """The merged model export wrote, in eval mode (dtype... passed on)."""
    return load_base(str(run.merged_dir), chat_format, **from_pretrained).eval()
